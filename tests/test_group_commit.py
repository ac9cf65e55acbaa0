"""Group commit in the server: concurrent requests share one transaction, yet each gets its own
answer, none before the commit, and a failed commit fails every request of its batch."""

import asyncio
import sqlite3
import threading

import pytest

from sdm_peer import server as server_module
from sdm_peer.errors import LeaseLost, SdmPeerError
from sdm_peer.server import Server

from .conftest import grid
from .runs import make_run

SHAPE = {"cores": 2, "memory_gb": 4}


async def started(server):
    server._open()
    return server


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 60))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30))
        batches = recording_batches(server)
        claims = await asyncio.gather(*(server._execute("claim", {"worker_id": f"w{i}", **SHAPE})
                                        for i in range(60)))
        # A stale token among the reports: its own answer is a refusal, the others' are not.
        reports = [server._execute("complete", {"lease_token": c["experiment"]["lease_token"],
                                                "result": {"by": f"w{i}"}, "wall_seconds": 1.0})
                   for i, c in enumerate(claims)]
        reports.insert(30, server._execute("renew", {"lease_token": "stale"}))
        outcomes = await asyncio.gather(*reports, return_exceptions=True)
        server._close_store()
        return batches, claims, outcomes

    batches, claims, outcomes = asyncio.run(scenario())
    assert max(map(len, batches)) > 1  # requests really were committed together
    assert len({c["experiment"]["key"] for c in claims}) == 60
    assert isinstance(outcomes.pop(30), LeaseLost)
    assert [o["status"] for o in outcomes] == ["DONE"] * 60
    assert outcomes[-1]["config_done"] is True and sum(o["config_done"] for o in outcomes) == 1
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT a.worker, e.result FROM attempts a JOIN experiments e ON e.id = a.experiment"))
    assert rows == {f"w{i}": f'{{"by": "w{i}"}}' for i in range(60)}  # nobody got another's answer


class FailingCommit:
    """A connection whose COMMIT fails (as a full disk would make it)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_failed_commit_answers_every_request_of_the_batch_with_an_error(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30))
        real = server._store.conn
        server._store.conn = FailingCommit(real)
        outcomes = await asyncio.gather(*(server._execute("claim", {"worker_id": f"w{i}", **SHAPE})
                                          for i in range(10)), return_exceptions=True)
        server._store.conn = real
        after = await server._execute("status", {})
        server._close_store()
        return outcomes, after

    outcomes, after = asyncio.run(scenario())
    assert all(isinstance(o, SdmPeerError) and o.code == "INTERNAL" for o in outcomes), outcomes
    assert after["totals"]["started"] == 0 and after["totals"]["not_started"] == 10
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 0


@pytest.mark.parametrize("durable, expected", [(False, 1), (True, 2)])
def test_durable_mode_sets_synchronous_full(tmp_path, durable, expected):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 1))

    async def scenario():
        server = await started(Server(db, token, durable=durable))
        level = server._store.conn.execute("PRAGMA synchronous").fetchone()[0]
        server._close_store()
        return level

    assert asyncio.run(scenario()) == expected


def recording_batches(server):
    """The ops of each batch the server runs, in order."""
    batches = []
    run_batch = server._run_batch
    server._run_batch = lambda requests: batches.append([op for op, _ in requests]) or run_batch(requests)
    return batches


def test_renewals_wait_for_company_and_any_other_request_starts_the_batch_at_once(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        # A gathering window far longer than the test: only another request can start the batch.
        server = await started(Server(db, token, lease_seconds=30, renew_gather=3600))
        claims = [await server._execute("claim", {"worker_id": f"w{i}", **SHAPE}) for i in range(3)]
        batches = recording_batches(server)
        renewals = [asyncio.ensure_future(server._execute("renew", {"lease_token": c["experiment"]["lease_token"]}))
                    for c in claims]
        await asyncio.sleep(0)  # let the renewals queue
        waiting = not any(renewal.done() for renewal in renewals)
        claim = await asyncio.wait_for(server._execute("claim", {"worker_id": "w3", **SHAPE}), 10)
        answers = await asyncio.wait_for(asyncio.gather(*renewals), 10)
        server._close_store()
        return waiting, batches, claim, answers

    waiting, batches, claim, answers = asyncio.run(scenario())
    assert waiting  # renewals alone wait for company...
    assert batches == [["renew", "renew", "renew", "claim"]]  # ...and share the next request's commit
    assert [answer["lease_seconds_left"] for answer in answers] == [30] * 3
    assert claim["experiment"]["attempt"] == 1


def test_renewals_alone_are_answered_after_the_gathering_window_in_one_batch(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30, renew_gather=0.05))
        claims = [await server._execute("claim", {"worker_id": f"w{i}", **SHAPE}) for i in range(5)]
        batches = recording_batches(server)
        answers = await asyncio.wait_for(asyncio.gather(*(
            server._execute("renew", {"lease_token": c["experiment"]["lease_token"]}) for c in claims)), 10)
        server._close_store()
        return batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [["renew"] * 5]
    assert len(answers) == 5


def test_status_is_read_on_its_own_thread_and_writes_go_on_meanwhile(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30))
        await server._execute("claim", {"worker_id": "w1", **SHAPE})
        batches = recording_batches(server)
        reading, go_on = threading.Event(), threading.Event()
        read = server._read

        def slow_read(op, args):  # a whole-run overview of a big study takes a while
            reading.set()
            go_on.wait(30)
            return read(op, args)
        server._read = slow_read
        status = asyncio.ensure_future(server._execute("status", {}))
        await asyncio.get_running_loop().run_in_executor(None, reading.wait, 30)
        try:
            claim = await asyncio.wait_for(server._execute("claim", {"worker_id": "w2", **SHAPE}), 10)
            still_reading = not status.done()
        finally:
            go_on.set()
        answer = await asyncio.wait_for(status, 10)
        server._close_store()
        return claim, still_reading, answer, batches

    claim, still_reading, status, batches = asyncio.run(scenario())
    assert claim["experiment"] is not None and still_reading  # the write was answered while status read
    assert status["totals"]["started"] == 2 and status["totals"]["not_started"] == 8  # the committed state
    assert batches == [["claim"]]  # no write transaction for the read


def test_a_batch_starts_once_everyone_the_last_one_answered_has_asked_again(tmp_path, monkeypatch):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30))
        loop = asyncio.get_running_loop()
        batches = recording_batches(server)
        # The last batch held three requests and took an hour: two requests wait for a third...
        monkeypatch.setattr(server_module, "MAX_PACE_SECONDS", 7200)
        server._last_batch = (3, 3600.0, loop.time())
        first = [asyncio.ensure_future(server._execute("claim", {"worker_id": f"w{i}", **SHAPE})) for i in range(2)]
        for _ in range(10):
            await asyncio.sleep(0)
        waited = not any(claim.done() for claim in first)
        third = await asyncio.wait_for(server._execute("claim", {"worker_id": "w2", **SHAPE}), 10)
        claims = [await asyncio.wait_for(claim, 10) for claim in first] + [third]
        # ...and a request that is alone waits only as long as the last batch took, and at most
        # MAX_PACE_SECONDS.
        monkeypatch.undo()
        server._last_batch = (3, 3600.0, loop.time())
        alone = await asyncio.wait_for(server._execute("claim", {"worker_id": "w3", **SHAPE}), 10)
        server._close_store()
        return waited, batches, claims + [alone]

    waited, batches, claims = asyncio.run(scenario())
    assert waited
    assert batches == [["claim"] * 3, ["claim"]]
    assert len({claim["experiment"]["key"] for claim in claims}) == 4

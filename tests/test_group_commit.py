"""Group commit in the server: concurrent requests share one transaction, yet each gets its own
answer, none before the commit, and a failed commit fails every request of its batch."""

import asyncio
import sqlite3
import threading

import pytest

from sdm_peer.errors import LeaseLost, SdmPeerError
from sdm_peer.server import Server

from .conftest import LEASE, T0, grid
from .runs import make_run

SHAPE = {"cores": 2, "memory_gb": 4}


async def started(server):
    await server._on_db(server._open)
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
        await server._on_db(server._close_store)
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
        await server._on_db(server._close_store)
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
        level = await server._on_db(lambda: server._store.conn.execute("PRAGMA synchronous").fetchone()[0])
        await server._on_db(server._close_store)
        return level

    assert asyncio.run(scenario()) == expected


def recording_batches(server):
    """The sizes of the batches the server hands to its database thread, in order."""
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
        await server._on_db(server._close_store)
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
        await server._on_db(server._close_store)
        return batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [["renew"] * 5]
    assert len(answers) == 5


def test_status_is_read_beside_the_database_thread_never_behind_it(tmp_path):
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    async def scenario():
        server = await started(Server(db, token, lease_seconds=30))
        await server._execute("claim", {"worker_id": "w1", **SHAPE})
        batches = recording_batches(server)
        writer_free = threading.Event()
        busy = server._db_thread.submit(writer_free.wait, 30)  # the writer is tied up
        try:
            status = await asyncio.wait_for(server._execute("status", {}), 10)
        finally:
            writer_free.set()
        busy.result()
        await server._on_db(server._close_store)
        return status, batches

    status, batches = asyncio.run(scenario())
    assert status["totals"]["started"] == 1 and status["totals"]["not_started"] == 9  # the committed state
    assert batches == []  # no write transaction for a read


def savepoints_taken(store):
    """The SAVEPOINT statements `store` runs from now on, counted."""
    taken = []
    store.conn.set_trace_callback(lambda sql: sql.startswith("SAVEPOINT") and taken.append(sql))
    return taken


def test_refusals_in_a_batch_take_no_savepoint_and_write_nothing(make_store):
    """Every refusal comes before a transition's first write: a batch of refusals and
    successes needs no savepoint, and a refused request leaves nothing behind."""
    store = make_store(grid([(2, 4)], 3))
    held = store.claim("w1", 2, 4, now=T0, lease_seconds=LEASE)["experiment"]
    taken = savepoints_taken(store)
    outcomes = store.run_batch([
        lambda: store.claim("w2", 9, 9, now=T0, lease_seconds=LEASE),  # no config of this shape
        lambda: store.renew(lease_token="stale", now=T0, lease_seconds=LEASE),
        lambda: store.complete(held["lease_token"], {}, 1.0, now=T0, host={"cpus": ["not", "a", "string"]}),
        lambda: store.claim("w3", 2, 4, now=T0, lease_seconds=LEASE)])
    assert [type(value).__name__ for ok, value in outcomes if not ok] == ["NoSuchConfig", "LeaseLost", "BadInput"]
    assert outcomes[3][0] and outcomes[3][1]["experiment"]["attempt"] == 1
    assert taken == []
    workers = {row[0] for row in store.conn.execute("SELECT id FROM workers")}
    assert workers == {"w1", "w3"}  # the refused claim did not touch its worker row
    assert store.status(now=T0)["totals"]["started"] == 2  # the refused report did not finish its experiment


def test_a_transition_failing_after_its_first_write_has_only_its_own_writes_undone(make_store):
    """A failure after writing (here a number SQLite cannot store, met after the experiment
    was moved to DONE): the batch runs again with a savepoint per transition, so the others
    commit and the failed one changed nothing."""
    store = make_store(grid([(2, 4)], 3))
    first, second = (store.claim(f"w{n}", 2, 4, now=T0, lease_seconds=LEASE)["experiment"] for n in (1, 2))
    taken = savepoints_taken(store)
    outcomes = store.run_batch([
        lambda: store.complete(first["lease_token"], {}, 1.0, now=T0, host={"steal_seconds": 2 ** 70}),
        lambda: store.complete(second["lease_token"], {}, 1.0, now=T0),
        lambda: store.claim("w3", 2, 4, now=T0, lease_seconds=LEASE)])
    assert not outcomes[0][0] and isinstance(outcomes[0][1], OverflowError)
    assert outcomes[1] == (True, outcomes[1][1]) and outcomes[1][1]["status"] == "DONE"
    assert outcomes[2][0] and outcomes[2][1]["experiment"]["attempt"] == 1
    assert len(taken) == 3  # run again, one savepoint per transition
    statuses = dict(store.conn.execute("SELECT key, status FROM experiments").fetchall())
    assert statuses[first["key"]] == "STARTED" and statuses[second["key"]] == "DONE"
    assert [a["outcome"] for a in store.attempts(first["key"])] == [None]  # its attempt still runs

"""The experiment lease transitions of DESIGN §3, one case per row of its table, written once and
run against two backends: the Store itself, and a real server on 127.0.0.1 spoken to through the
real Client. Both run on a clock the test moves (the store takes `now`; the server `clock=`), so
an expiry is a step of the clock, never a wait."""

import asyncio
import json
import signal
import sqlite3
import threading

import pytest

from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.errors import LeaseLost
from sdm_peer.plan import read_plan
from sdm_peer.server import Server
from sdm_peer.store import Store

from .conftest import LEASE, T0, grid, write_plan

SHAPE = (2, 4)
TOKEN = "contract-token"


class Clock:
    """The backend's clock: stands still until the test moves it."""

    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Backend:
    """The lease ops at the backend's clock, and the run's database file to check them against.
    A refusal raises its error class (LeaseLost) on both."""

    def __init__(self, db, clock):
        self.db, self.clock = db, clock

    def row(self, key):
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return dict(conn.execute("SELECT * FROM experiments WHERE key = ?", (key,)).fetchone())

    def attempts(self, key):
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(a) for a in conn.execute(
                "SELECT a.* FROM attempts a JOIN experiments e ON e.id = a.experiment WHERE e.key = ?"
                " ORDER BY a.number", (key,))]


class StoreBackend(Backend):
    def __init__(self, db, clock):
        super().__init__(db, clock)
        self.store = Store(db, create=False)

    def claim(self, worker="w1"):
        return self.store.claim(worker, *SHAPE, now=self.clock(), lease_seconds=LEASE)

    def renew(self, token):
        return self.store.renew(lease_token=token, now=self.clock(), lease_seconds=LEASE)

    def complete(self, token, result, wall_seconds):
        return self.store.complete(token, result, wall_seconds, now=self.clock())

    def fail(self, token, error, exit_code, wall_seconds):
        return self.store.fail(token, error, exit_code, wall_seconds, now=self.clock())

    def release(self, token, reason):
        return self.store.release(lease_token=token, reason=reason, now=self.clock())

    def close(self):
        self.store.close()


class SocketBackend(Backend):
    """A Server in a thread of this process; SIGTERM's handler (recorded, since only the main
    thread may install real ones) is what stops it."""

    def __init__(self, db, clock):
        super().__init__(db, clock)
        self._listening_event, self._address, self._handlers = threading.Event(), None, {}
        server = Server(db, TOKEN, port=0, lease_seconds=LEASE, clock=clock, on_listening=self._listening)
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
        self._thread.start()
        assert self._listening_event.wait(20), "the server did not start listening"
        self.client = Client(self._address, TOKEN, retry_seconds=5)

    def _listening(self, host, port):
        self._address = (host, port)
        self._listening_event.set()

    def _serve(self, server):
        loop = asyncio.new_event_loop()
        loop.add_signal_handler = lambda signum, callback: self._handlers.setdefault(signum, (loop, callback))
        try:
            loop.run_until_complete(server.run())
        finally:
            loop.close()

    def claim(self, worker="w1"):
        return self.client.call("claim", worker_id=worker, cores=SHAPE[0], memory_gb=SHAPE[1])

    def renew(self, token):
        return self.client.call("renew", lease_token=token)

    def complete(self, token, result, wall_seconds):
        return self.client.call("complete", lease_token=token, result=result, wall_seconds=wall_seconds)

    def fail(self, token, error, exit_code, wall_seconds):
        return self.client.call("fail", lease_token=token, error=error, exit_code=exit_code,
                                wall_seconds=wall_seconds)

    def release(self, token, reason):
        return self.client.call("release", lease_token=token, reason=reason)

    def close(self):
        self.client.close()
        loop, stop = self._handlers[signal.SIGTERM]
        loop.call_soon_threadsafe(stop)
        self._thread.join(20)
        assert not self._thread.is_alive(), "the server did not stop on SIGTERM"


@pytest.fixture
def make_run_db(tmp_path):
    """make_run_db(count, **settings): a run database of `count` experiments of SHAPE, closed."""

    def make(count, **settings):
        db = tmp_path / "run.db"
        store = Store(db)
        store.import_plan(read_plan(write_plan(tmp_path / "plan.json", grid([SHAPE], count))),
                          settings=settings, now=T0)
        store.close()
        return db
    return make


class LeaseContract:
    """One case per row of DESIGN §3's transition table, against the backend class `opens`."""

    opens = None

    @pytest.fixture
    def backend(self, make_run_db):
        """backend(count, **settings): a backend on a new run of `count` experiments; closed at the end."""
        made = []

        def make(count, **settings):
            made.append(self.opens(make_run_db(count, **settings), Clock()))
            return made[-1]
        yield make
        for backend in made:
            backend.close()

    # NOT STARTED, INTERRUPTED, ERROR --claim--> STARTED, new lease token, attempts+1

    def test_claim_starts_a_not_started_experiment_with_a_fresh_lease(self, backend):
        run = backend(2)
        answer = run.claim()
        experiment = answer["experiment"]
        assert answer["config_done"] is False and answer["provision"] is None
        assert experiment["attempt"] == 1 and experiment["lease_seconds_left"] == LEASE
        assert experiment["params"] == {"i": 0} and len(experiment["lease_token"]) >= 20
        stored = run.row(experiment["key"])
        assert (stored["status"], stored["lease_owner"], stored["attempts"]) == (st.STARTED, "w1", 1)
        assert stored["lease_token"] == experiment["lease_token"] and stored["lease_expires_at"] == T0 + LEASE
        assert [a["outcome"] for a in run.attempts(experiment["key"])] == [None]

    def test_claims_give_distinct_experiments_then_none(self, backend):
        run = backend(2)
        first, second, third = (run.claim(f"w{i}") for i in range(3))
        assert first["experiment"]["key"] != second["experiment"]["key"]
        assert third["experiment"] is None and third["config_done"] is False
        assert third["retry_after"] == pytest.approx(LEASE)

    def test_claim_takes_an_interrupted_experiment_with_a_new_lease(self, backend):
        run = backend(1)
        old = run.claim()["experiment"]
        run.clock.advance(1)
        run.release(old["lease_token"], "SIGTERM")
        new = run.claim("w2")["experiment"]
        assert new["key"] == old["key"] and new["attempt"] == 2 and new["lease_token"] != old["lease_token"]
        stored = run.row(new["key"])
        assert (stored["status"], stored["lease_owner"], stored["attempts"]) == (st.STARTED, "w2", 2)

    def test_claim_takes_an_errored_experiment_with_a_new_lease(self, backend):
        run = backend(1)
        old = run.claim()["experiment"]
        run.clock.advance(1)
        run.fail(old["lease_token"], "boom", 1, 0.5)
        new = run.claim("w2")["experiment"]
        assert new["key"] == old["key"] and new["attempt"] == 2 and new["lease_token"] != old["lease_token"]
        stored = run.row(new["key"])
        assert (stored["status"], stored["attempts"], stored["failures"]) == (st.STARTED, 2, 1)

    # STARTED, lease expired --any claim on that config--> NOT STARTED (attempt EXPIRED), then claimable

    def test_an_expired_lease_is_taken_back_by_the_next_claim(self, backend):
        run = backend(1)
        old = run.claim()["experiment"]
        run.clock.advance(LEASE + 0.001)
        new = run.claim("w2")["experiment"]
        assert new["key"] == old["key"] and new["attempt"] == 2 and new["lease_token"] != old["lease_token"]
        assert [a["outcome"] for a in run.attempts(old["key"])] == [st.EXPIRED, None]
        stored = run.row(old["key"])
        assert (stored["interruptions"], stored["failures"], stored["lease_owner"]) == (1, 0, "w2")

    def test_a_lease_not_yet_expired_is_not_taken(self, backend):
        run = backend(1)
        run.claim()
        run.clock.advance(LEASE - 1)
        assert run.claim("w2")["experiment"] is None

    # STARTED, token matches --renew--> STARTED, expiry pushed out

    def test_renew_pushes_the_expiry_out(self, backend):
        run = backend(1)
        experiment = run.claim()["experiment"]
        run.clock.advance(50)
        assert run.renew(experiment["lease_token"]) == {"lease_seconds_left": LEASE}
        assert run.row(experiment["key"])["lease_expires_at"] == T0 + 50 + LEASE
        run.clock.advance(LEASE - 49)  # past the first expiry, not the renewed one
        assert run.claim("w2")["experiment"] is None
        assert run.row(experiment["key"])["status"] == st.STARTED

    def test_renew_of_a_lapsed_lease_nobody_took_still_holds(self, backend):
        run = backend(1)
        experiment = run.claim()["experiment"]
        run.clock.advance(5 * LEASE)
        run.renew(experiment["lease_token"])
        assert run.row(experiment["key"])["status"] == st.STARTED

    # STARTED, token matches --complete--> DONE, result stored

    def test_complete_stores_the_result_and_finishes_the_config(self, backend):
        run = backend(1)
        experiment = run.claim()["experiment"]
        run.clock.advance(13)
        answer = run.complete(experiment["lease_token"], {"auc": 0.9}, 12.5)
        assert answer["status"] == st.DONE and answer["config_done"] is True and answer["provision"] is None
        stored = run.row(experiment["key"])
        assert (stored["status"], stored["wall_seconds"], stored["lease_token"]) == (st.DONE, 12.5, None)
        assert json.loads(stored["result"]) == {"auc": 0.9}
        assert [a["outcome"] for a in run.attempts(experiment["key"])] == [st.DONE]
        assert run.claim("w2")["config_done"] is True

    # STARTED, token matches --fail--> ERROR (failures+1), or FAILED at max_failures

    def test_fail_is_error_then_failed_at_max_failures(self, backend):
        run = backend(1, max_failures=2)
        experiment = run.claim()["experiment"]
        run.clock.advance(1)
        first = run.fail(experiment["lease_token"], "boom\ntraceback", 1, 0.5)
        assert first["status"] == st.ERROR and first["config_done"] is False
        stored = run.row(experiment["key"])
        assert (stored["status"], stored["failures"], stored["interruptions"]) == (st.ERROR, 1, 0)
        experiment = run.claim()["experiment"]
        run.clock.advance(1)
        second = run.fail(experiment["lease_token"], "boom again", 1, 0.5)
        assert second["status"] == st.FAILED and second["config_done"] is True
        stored = run.row(experiment["key"])
        assert stored["failures"] == 2 and "max_failures" in stored["failed_reason"]
        assert [(a["outcome"], a["exit_code"]) for a in run.attempts(experiment["key"])] == [(st.ERROR, 1)] * 2

    # STARTED, token matches --release--> INTERRUPTED (FAILED at max_interruptions)

    def test_release_is_interrupted_and_not_a_failure(self, backend):
        run = backend(1)
        experiment = run.claim()["experiment"]
        run.clock.advance(1)
        assert run.release(experiment["lease_token"], "SIGTERM") == {"released": 1}
        stored = run.row(experiment["key"])
        assert (stored["status"], stored["interruptions"], stored["failures"]) == (st.INTERRUPTED, 1, 0)
        assert stored["lease_token"] is None
        assert [a["outcome"] for a in run.attempts(experiment["key"])] == [st.INTERRUPTED]

    def test_interruptions_end_in_failed_at_max_interruptions(self, backend):
        run = backend(1, max_interruptions=2)
        experiment = run.claim()["experiment"]
        run.clock.advance(1)
        run.release(experiment["lease_token"], "preempted")
        run.claim()
        run.clock.advance(LEASE + 1)
        answer = run.claim("w2")  # the second interruption: an expiry
        stored = run.row(experiment["key"])
        assert stored["status"] == st.FAILED and "max_interruptions" in stored["failed_reason"]
        assert answer["experiment"] is None and answer["config_done"] is True

    # anything, token does not match --renew/complete/fail/release--> LEASE_LOST, nothing changed

    @pytest.mark.parametrize("op", ["renew", "complete", "fail", "release"])
    def test_a_forged_token_is_lease_lost_and_changes_nothing(self, backend, op):
        run = backend(1)
        experiment = run.claim()["experiment"]
        before, attempts = run.row(experiment["key"]), run.attempts(experiment["key"])
        run.clock.advance(1)
        with pytest.raises(LeaseLost):
            self.report(run, op, "forged")
        assert run.row(experiment["key"]) == before and run.attempts(experiment["key"]) == attempts

    @pytest.mark.parametrize("op", ["renew", "complete", "fail", "release"])
    def test_a_token_taken_back_is_lease_lost_and_changes_nothing(self, backend, op):
        run = backend(1)
        old = run.claim()["experiment"]
        run.clock.advance(LEASE + 1)
        run.claim("w2")
        before = run.row(old["key"])
        run.clock.advance(1)
        with pytest.raises(LeaseLost):
            self.report(run, op, old["lease_token"])
        assert run.row(old["key"]) == before

    @pytest.mark.parametrize("op", ["renew", "complete", "fail", "release"])
    def test_a_token_of_a_finished_experiment_is_lease_lost(self, backend, op):
        run = backend(1)
        experiment = run.claim()["experiment"]
        run.complete(experiment["lease_token"], {"x": 1}, 1.0)
        before = run.row(experiment["key"])
        if op == "complete":  # the same report again is answered again (a retried call), not refused
            again = run.complete(experiment["lease_token"], {"x": 2}, 2.0)
            assert again["duplicate"] is True and again["status"] == st.DONE
        else:
            with pytest.raises(LeaseLost):
                self.report(run, op, experiment["lease_token"])
        assert run.row(experiment["key"]) == before

    def test_a_late_result_is_kept_in_its_attempt_never_over_the_others(self, backend):
        run = backend(1)
        old = run.claim()["experiment"]
        run.clock.advance(LEASE + 1)
        new = run.claim("w2")["experiment"]
        run.complete(new["lease_token"], {"by": "w2"}, 1.0)
        with pytest.raises(LeaseLost):
            run.complete(old["lease_token"], {"by": "w1"}, 99.0)
        assert json.loads(run.row(old["key"])["result"]) == {"by": "w2"}
        late, kept = run.attempts(old["key"])
        assert (late["outcome"], json.loads(late["result"]), late["wall_seconds"]) == (st.LOST, {"by": "w1"}, 99.0)
        assert kept["outcome"] == st.DONE

    @staticmethod
    def report(run, op, token):
        if op == "renew":
            return run.renew(token)
        if op == "complete":
            return run.complete(token, {"late": True}, 1.0)
        if op == "fail":
            return run.fail(token, "late", 1, 1.0)
        return run.release(token, "late")


class TestStore(LeaseContract):
    opens = StoreBackend


class TestSocket(LeaseContract):
    opens = SocketBackend

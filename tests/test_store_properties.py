"""The DESIGN §3 invariants under random sequences of worker calls, on a real SQLite file.

A hypothesis state machine plays several workers of three shapes against one Store with the
`local` provider (so hand-offs happen): claims, renewals, completions, failures and releases with
any token handed out so far (stale ones included), releases by worker id, clock jumps shorter
and longer than the lease, `bootstrap`'s acquire_provisioning and `provisioned`. After every
step the rows are read back with plain SQL and checked against the contract, and every status
and state change that TEMP triggers saw is checked against the transition tables."""

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sdm_peer import states as st
from sdm_peer.errors import LeaseLost
from sdm_peer.plan import read_plan
from sdm_peer.store import Store

from .conftest import T0, grid, write_plan
from .moves import illegal, take_moves, watch_moves

LEASE = 30.0
PROVISION_LEASE = 45.0
SHAPES = [(2, 4), (4, 8), (8, 16)]
PER_CONFIG = 2
WORKERS = ["w1", "w2", "w3", "w4"]
CONFIG_ORDER = {state: index for index, state in enumerate(st.CONFIG_STATES)}
COUNT_FIELDS = ["total", *st.COUNT_FIELDS.values()]


def table(conn, name):
    """Every row of a table, as plain dicts keyed by primary key."""
    return {row["id"]: dict(row) for row in conn.execute(f"SELECT * FROM {name} ORDER BY id")}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sdm-prop-"))
        plan = read_plan(write_plan(self.dir / "plan.json", grid(SHAPES, PER_CONFIG)))
        self.store = Store(self.dir / "run.db")
        self.store.import_plan(plan, settings={"provider": "local", "max_failures": 2, "max_interruptions": 3,
                                               "provision_lease_seconds": PROVISION_LEASE}, now=T0)
        self.conn = self.store.conn
        watch_moves(self.conn)
        self.now = T0
        self.lease_tokens = ["forged-lease-token"]
        self.provision_tokens = ["forged-provision-token"]
        self.claims = 0  # successful claims that returned a new lease
        self.token_owner = {}  # lease token -> the worker it was handed to
        self.done = {}  # experiment id -> (status, result, wall_seconds) when first seen DONE
        self.config_states = {}  # config id -> last state seen

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def snapshot(self):
        return table(self.conn, "experiments"), table(self.conn, "configs")

    def call(self, function, *args, **kwargs):
        """Run one store call; a LeaseLost refusal must leave experiments and configs untouched,
        and so must an answer that says it only repeated an earlier report."""
        before = self.snapshot()
        try:
            answer = function(*args, now=self.now, **kwargs)
        except LeaseLost:
            assert self.snapshot() == before, f"a refused {function.__name__} changed rows"
            return None
        if answer.get("duplicate"):
            assert self.snapshot() == before, f"a repeated {function.__name__} changed rows"
        self.collect(answer)
        return answer

    def collect(self, answer):
        provision = answer.get("provision")
        if provision is not None:
            assert provision["provision_token"] not in self.provision_tokens
            self.provision_tokens.append(provision["provision_token"])

    def lease_token(self, data):
        """A token handed out so far: often one that is held right now, else any (stale ones
        and a forged one included)."""
        held = [token for (token,) in self.conn.execute(
            "SELECT lease_token FROM experiments WHERE lease_token IS NOT NULL ORDER BY id")]
        choices = hs.sampled_from(list(self.lease_tokens))
        if held:
            choices = hs.one_of(hs.sampled_from(held), choices)
        return data.draw(choices)

    def shape_of_state(self, states):
        return [(row["cores"], row["memory_gb"]) for row in self.conn.execute(
            "SELECT cores, memory_gb FROM configs WHERE state IN (%s)" % ",".join("?" * len(states)),
            tuple(states))]

    # ------------------------------------------------------------------ rules

    def _claim(self, worker, shape):
        answer = self.call(self.store.claim, worker, *shape, lease_seconds=LEASE)
        experiment = answer["experiment"]
        if experiment is not None:
            assert experiment["lease_seconds_left"] == LEASE
            token = experiment["lease_token"]
            if token in self.token_owner:
                # The same lease again (its first answer was "lost"): only ever to its holder.
                assert self.token_owner[token] == worker
            else:
                self.claims += 1
                assert token not in self.lease_tokens
                self.token_owner[token] = worker
                self.lease_tokens.append(token)
        else:
            unfinished = self.conn.execute(
                "SELECT COUNT(*) FROM experiments e JOIN configs c ON c.id = e.config"
                " WHERE c.cores = ? AND c.memory_gb = ? AND e.status IN ('NOT STARTED', 'ERROR', 'INTERRUPTED')",
                shape).fetchone()[0]
            assert unfinished == 0, "claim returned nothing while an experiment of its shape was claimable"

    @rule(worker=hs.sampled_from(WORKERS), shape=hs.sampled_from(SHAPES))
    def claim_any_shape(self, worker, shape):
        """A worker of any shape, even one whose group was never provisioned (started by hand)."""
        self._claim(worker, shape)

    @precondition(lambda self: self.shape_of_state([st.PROVISIONING, st.RUNNING, st.CONFIG_DONE]))
    @rule(worker=hs.sampled_from(WORKERS), data=hs.data())
    def claim_live_shape(self, worker, data):
        """A worker of a group that exists: the usual case, which lets hand-offs happen."""
        shape = data.draw(hs.sampled_from(self.shape_of_state([st.PROVISIONING, st.RUNNING, st.CONFIG_DONE])))
        self._claim(worker, shape)

    @precondition(lambda self: self.shape_of_state([st.PROVISIONING, st.RUNNING]))
    @rule(worker=hs.sampled_from(WORKERS), data=hs.data(), value=hs.integers(0, 9))
    def claim_and_complete(self, worker, data, value):
        """What a healthy worker of an existing group does: claim, run, report at once."""
        shape = data.draw(hs.sampled_from(self.shape_of_state([st.PROVISIONING, st.RUNNING])))
        self._claim(worker, shape)
        token = self.lease_tokens[-1]
        held = self.conn.execute("SELECT COUNT(*) FROM experiments WHERE lease_token = ?", (token,)).fetchone()[0]
        if held:
            answer = self.call(self.store.complete, token, {"value": value, "token": token}, float(value))
            assert answer["status"] == st.DONE and "duplicate" not in answer

    @rule(data=hs.data())
    def renew(self, data):
        token = self.lease_token(data)
        answer = self.call(self.store.renew, lease_token=token, lease_seconds=LEASE)
        if answer is not None:
            expires = self.conn.execute("SELECT lease_expires_at FROM experiments WHERE lease_token = ?",
                                        (token,)).fetchone()[0]
            assert expires == self.now + LEASE

    @rule(data=hs.data(), value=hs.integers(0, 9))
    def complete(self, data, value):
        token = self.lease_token(data)
        self.call(self.store.complete, token, {"value": value, "token": token}, float(value))

    @rule(data=hs.data(), exit_code=hs.integers(1, 3))
    def fail(self, data, exit_code):
        token = self.lease_token(data)
        self.call(self.store.fail, token, "boom", exit_code, 0.5)

    @rule(data=hs.data())
    def release_token(self, data):
        token = self.lease_token(data)
        held = self.conn.execute("SELECT COUNT(*) FROM experiments WHERE lease_token = ?", (token,)).fetchone()[0]
        answer = self.call(self.store.release, lease_token=token, reason="SIGTERM")
        assert (answer is not None) == bool(held)
        if answer is not None:
            assert answer["released"] == 1

    @rule(worker=hs.sampled_from([*WORKERS, "never-seen"]))
    def release_worker(self, worker):
        held = self.conn.execute("SELECT COUNT(*) FROM experiments WHERE lease_owner = ?", (worker,)).fetchone()[0]
        answer = self.call(self.store.release, worker_id=worker, reason="shutdown")
        assert answer == {"released": held}
        assert self.conn.execute("SELECT COUNT(*) FROM experiments WHERE lease_owner = ?", (worker,)).fetchone()[0] == 0

    @rule(seconds=hs.one_of(hs.integers(1, 10), hs.integers(int(LEASE) + 1, int(3 * PROVISION_LEASE))))
    def clock_jumps(self, seconds):
        self.now += seconds

    @rule()
    def acquire_provisioning(self):
        self.call(self.store.acquire_provisioning, "bootstrap")

    @rule(data=hs.data(), worker=hs.sampled_from(WORKERS))
    def provisioned(self, data, worker):
        token = data.draw(hs.sampled_from(list(self.provision_tokens)))
        self.call(self.store.provisioned, token, worker_id=worker)

    @rule(data=hs.data())
    def renew_provisioning(self, data):
        token = data.draw(hs.sampled_from(list(self.provision_tokens)))
        self.call(self.store.renew, provision_token=token, lease_seconds=LEASE)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def every_move_is_in_the_transition_tables(self):
        moves = take_moves(self.conn)
        assert not illegal(moves), illegal(moves)

    @invariant()
    def leases_match_statuses_and_attempts(self):
        experiments = table(self.conn, "experiments")
        attempts = table(self.conn, "attempts")
        open_attempts = {}
        for attempt in attempts.values():
            if attempt["outcome"] is None:
                open_attempts.setdefault(attempt["experiment"], []).append(attempt)
        for exp in experiments.values():
            live = open_attempts.get(exp["id"], [])
            assert len(live) <= 1, f"experiment {exp['key']} is held by {len(live)} live leases"
            lease = (exp["lease_owner"], exp["lease_token"], exp["lease_expires_at"])
            if exp["status"] == st.STARTED:
                assert None not in lease
                assert len(live) == 1 and live[0]["lease_token"] == exp["lease_token"]
                assert live[0]["worker"] == exp["lease_owner"]
            else:
                assert lease == (None, None, None), exp
                assert not live
            mine = sorted((a for a in attempts.values() if a["experiment"] == exp["id"]), key=lambda a: a["id"])
            assert [a["number"] for a in mine] == list(range(1, exp["attempts"] + 1))
            outcomes = [a["outcome"] for a in mine]
            assert exp["failures"] == outcomes.count(st.ERROR)
            assert exp["interruptions"] == sum(outcomes.count(o) for o in (st.INTERRUPTED, st.EXPIRED, st.LOST))
            assert outcomes.count(st.DONE) == (1 if exp["status"] == st.DONE else 0)
            assert exp["failures"] <= 2 and exp["interruptions"] <= 3
            if exp["status"] == st.FAILED:
                assert exp["failures"] == 2 or exp["interruptions"] == 3
        assert len(attempts) == self.claims

    @invariant()
    def done_experiments_never_change(self):
        for row in self.conn.execute(f"SELECT id, status, result, wall_seconds FROM experiments"):
            if row["id"] in self.done:
                assert (row["status"], row["result"], row["wall_seconds"]) == self.done[row["id"]], \
                    "a DONE experiment changed"
            elif row["status"] == st.DONE:
                assert json.loads(row["result"])["value"] == row["wall_seconds"]
                self.done[row["id"]] = (row["status"], row["result"], row["wall_seconds"])

    @invariant()
    def configs_move_forward_and_are_done_exactly_when_finished(self):
        for config in table(self.conn, "configs").values():
            previous = self.config_states.get(config["id"], st.WAITING)
            assert CONFIG_ORDER[config["state"]] >= CONFIG_ORDER[previous], \
                f"{config['name']} went back from {previous} to {config['state']}"
            self.config_states[config["id"]] = config["state"]
            unfinished = self.conn.execute(
                "SELECT COUNT(*) FROM experiments WHERE config = ? AND status NOT IN ('DONE', 'FAILED', 'LEGACY')",
                (config["id"],)).fetchone()[0]
            assert (config["state"] == st.CONFIG_DONE) == (unfinished == 0), config
            if config["state"] == st.PROVISIONING:
                assert config["provision_token"] is not None
                assert (config["provision_expires_at"] is None) == (config["provisioned_at"] is not None)

    @invariant()
    def one_handoff_per_config_that_left_waiting(self):
        """A config leaves WAITING either by a hand-off (exactly one, before anything else) or,
        when a worker of its shape turns up before any group was made for it, by that claim."""
        events = [dict(row) for row in self.conn.execute(
            "SELECT kind, config FROM events WHERE kind IN ('handoff', 'config_running') ORDER BY id")]
        for config in table(self.conn, "configs").values():
            mine = [event["kind"] for event in events if event["config"] == config["name"]]
            handoffs = mine.count("handoff")
            if config["state"] == st.WAITING:
                assert mine == []
            elif config["state"] == st.PROVISIONING:
                assert mine == ["handoff"], (config["name"], mine)
            elif handoffs:
                assert handoffs == 1 and mine[0] == "handoff", (config["name"], mine)
            else:
                assert mine == ["config_running"], (config["name"], mine)
            assert mine.count("config_running") <= 1

    @invariant()
    def status_counts_equal_row_counts(self):
        status = self.store.status(now=self.now)
        expected = {}
        for row in self.conn.execute(
                "SELECT c.name, e.status, e.lease_expires_at FROM experiments e JOIN configs c ON c.id = e.config"):
            counts = expected.setdefault(row["name"], dict.fromkeys([*COUNT_FIELDS, "expired"], 0))
            counts["total"] += 1
            counts[st.COUNT_FIELDS[row["status"]]] += 1
            if row["status"] == st.STARTED and row["lease_expires_at"] <= self.now:
                counts["expired"] += 1
        states = {row["name"]: row["state"] for row in self.conn.execute("SELECT name, state FROM configs")}
        assert [c["name"] for c in status["configs"]] == ["c2-m4", "c4-m8", "c8-m16"]
        for config in status["configs"]:
            assert {k: config[k] for k in expected[config["name"]]} == expected[config["name"]]
            assert config["state"] == states[config["name"]]
        for field in [*COUNT_FIELDS, "expired"]:
            assert status["totals"][field] == sum(counts[field] for counts in expected.values()), field
        assert status["totals"]["total"] == len(SHAPES) * PER_CONFIG


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_store_state_machine = StoreMachine.TestCase

"""The store on a real SQLite file with a moved clock: what lies beyond the lease transitions of
DESIGN §3's table (those are tests/test_lease_contract.py's, run against the store and the socket)."""

import pytest

from sdm_peer import states as st
from sdm_peer.errors import LeaseLost, NoSuchConfig

from .conftest import LEASE, T0, claim, grid


def row(store, key):
    return dict(store.conn.execute("SELECT * FROM experiments WHERE key = ?", (key,)).fetchone())


def test_claim_starts_an_experiment_with_a_fresh_lease(make_store):
    store = make_store(grid([(2, 4)], 2))
    answer = claim(store)
    exp = answer["experiment"]
    assert exp["attempt"] == 1 and exp["lease_seconds_left"] == LEASE and exp["params"] == {"i": 0}
    stored = row(store, exp["key"])
    assert stored["status"] == st.STARTED and stored["lease_owner"] == "w1" and stored["attempts"] == 1
    assert stored["lease_expires_at"] == T0 + LEASE
    assert len(exp["lease_token"]) >= 20
    assert store.attempts(exp["key"])[0]["outcome"] is None
    assert store.status(now=T0)["configs"][0]["state"] == st.RUNNING


def test_claim_for_unknown_shape_is_refused(make_store):
    store = make_store(grid([(2, 4)], 1))
    with pytest.raises(NoSuchConfig, match="c2-m4"):
        claim(store, shape=(3, 4))


def test_complete_stores_result_and_finishes_config(make_store):
    store = make_store(grid([(2, 4)], 1))
    exp = claim(store)["experiment"]
    answer = store.complete(exp["lease_token"], {"auc": 0.9}, 12.5, now=T0 + 13)
    assert answer["config_done"] is True and answer["provision"] is None  # provider none
    stored = row(store, exp["key"])
    assert stored["status"] == st.DONE and stored["wall_seconds"] == 12.5 and stored["lease_token"] is None
    assert store.attempts(exp["key"])[0]["outcome"] == st.DONE
    assert store.status(now=T0)["configs"][0]["state"] == st.CONFIG_DONE
    assert claim(store, "w2", at=T0 + 14)["config_done"] is True


def test_release_by_worker_releases_all_its_leases(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 2))
    claim(store, "w1"), claim(store, "w1", shape=(4, 8)), claim(store, "w2")
    assert store.release(worker_id="w1", reason="shutdown", now=T0 + 1) == {"released": 2}
    assert store.release(worker_id="nobody", reason="shutdown", now=T0 + 1) == {"released": 0}
    counts = store.status(now=T0 + 1)["totals"]
    assert counts["interrupted"] == 2 and counts["started"] == 1


def test_handoff_goes_to_the_finisher_exactly_once(make_store):
    store = make_store(grid([(2, 4), (4, 8), (8, 16)], 2), provider="local")
    start = store.acquire_provisioning("bootstrap", now=T0)["provision"]
    assert start["config"] == "c2-m4" and start["previous"] is None
    assert store.acquire_provisioning("bootstrap", now=T0)["provision"] is None  # already leased
    store.provisioned(start["provision_token"], now=T0)
    a, b = claim(store, "w1")["experiment"], claim(store, "w2")["experiment"]
    first = store.complete(a["lease_token"], {}, 1.0, now=T0 + 1)
    assert first["provision"] is None and first["config_done"] is False
    second = store.complete(b["lease_token"], {}, 1.0, now=T0 + 2)
    assert second["config_done"] is True
    provision = second["provision"]
    assert provision["config"] == "c4-m8" and provision["previous"] == "c2-m4" and provision["group_size"] == 1
    # Repeating the finishing report does not hand off twice.
    assert store.complete(b["lease_token"], {}, 1.0, now=T0 + 3)["provision"] is None
    handoffs = [(e["config"], e["worker"]) for e in store.events(kind="handoff")]
    assert handoffs == [("c2-m4", "bootstrap"), ("c4-m8", "w2")]
    states = {c["name"]: c["state"] for c in store.status(now=T0)["configs"]}
    assert states == {"c2-m4": "DONE", "c4-m8": "PROVISIONING", "c8-m16": "WAITING"}


def test_idle_workers_of_a_done_config_wait_for_a_pending_handoff(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 1), provider="local", provision_lease_seconds=100)
    store.provisioned(store.acquire_provisioning("bootstrap", now=T0)["provision"]["provision_token"], now=T0)
    exp = claim(store, "w1")["experiment"]
    store.complete(exp["lease_token"], {}, 1.0, now=T0 + 1)
    idle = claim(store, "w2", at=T0 + 2)
    assert idle["config_done"] is True and idle["handoff_pending"] is True
    assert idle["retry_after"] == pytest.approx(99)


def test_lapsed_provisioning_lease_is_taken_over(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 1), provider="local", provision_lease_seconds=100)
    first = store.acquire_provisioning("bootstrap", now=T0)["provision"]
    store.provisioned(first["provision_token"], now=T0)
    exp = claim(store, "w1")["experiment"]
    handed = store.complete(exp["lease_token"], {}, 1.0, now=T0 + 1)["provision"]
    # w1 dies before `provisioned`; w2 (idle, same group) asks after the lease lapsed.
    assert claim(store, "w2", at=T0 + 50)["provision"] is None
    taken = claim(store, "w2", at=T0 + 102)["provision"]
    assert taken["config"] == "c4-m8" and taken["provision_token"] != handed["provision_token"]
    with pytest.raises(LeaseLost):
        store.provisioned(handed["provision_token"], now=T0 + 103)
    store.provisioned(taken["provision_token"], now=T0 + 103)
    store.provisioned(taken["provision_token"], now=T0 + 104)  # repeated: harmless
    assert [e["worker"] for e in store.events(kind="provision_takeover")] == ["w2"]
    assert len(store.events(kind="group_provisioned")) == 2
    assert claim(store, "w3", at=T0 + 105)["handoff_pending"] is False


def test_a_release_that_finishes_a_config_hands_off_to_the_next_worker_that_asks(make_store):
    """The releasing worker is stopping (SIGTERM, a preempted VM's shutdown script) and cannot
    provision: the next config's lease is there for the next claim at once, not after it lapses."""
    store = make_store(grid([(2, 4), (4, 8)], 1), provider="local", provision_lease_seconds=100,
                       max_interruptions=1)
    store.provisioned(store.acquire_provisioning("bootstrap", now=T0)["provision"]["provision_token"], now=T0)
    claim(store, "w1")
    assert store.release(worker_id="w1", reason="preempted", now=T0 + 1) == {"released": 1}
    assert {c["name"]: c["state"] for c in store.status(now=T0 + 1)["configs"]}["c2-m4"] == "DONE"
    taken = claim(store, "w2", at=T0 + 2)["provision"]
    assert taken["config"] == "c4-m8"
    assert [(e["config"], e["worker"]) for e in store.events(kind="handoff")] == [("c2-m4", "bootstrap"),
                                                                                  ("c4-m8", None)]
    assert [e["worker"] for e in store.events(kind="provision_takeover")] == ["w2"]


def test_provider_none_hands_out_no_provisioning_leases(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 1))
    assert store.acquire_provisioning("bootstrap", now=T0)["provision"] is None
    exp = claim(store)["experiment"]
    assert store.complete(exp["lease_token"], {}, 1.0, now=T0 + 1)["provision"] is None


def test_server_start_extends_every_held_lease(make_store):
    store = make_store(grid([(2, 4)], 2))
    live = claim(store, "w1")["experiment"]
    lapsed = claim(store, "w2", at=T0 - 100)["experiment"]
    assert store.extend_leases(now=T0 + 10, seconds=LEASE) == 2
    assert row(store, live["key"])["lease_expires_at"] == T0 + LEASE + LEASE
    assert row(store, lapsed["key"])["lease_expires_at"] == T0 + 10 + LEASE


def test_claim_query_is_an_index_seek_at_100k_experiments(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 50_000))
    store.conn.execute("ANALYZE")
    plan = " | ".join(store.query_plan("claim_next"))
    assert "USING COVERING INDEX experiments_claimable (config=?)" in plan or \
        "USING INDEX experiments_claimable (config=?)" in plan, plan
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan


# The statements every claim and report runs, and the index each must seek (None: its table's
# own key). A full SCAN of experiments or attempts in any of them costs a walk per request.
HOT_STATEMENTS = {
    "config_of_shape": "sqlite_autoindex_configs_4",
    "claim_next": "experiments_claimable",
    "reissue": "experiments_lease_owner",  # held by this worker already?
    "claim": "experiments_claimable",  # finds and leases the next one in one statement
    "expired_leases": "experiments_leased",
    "expire": None,
    "next_expiry": "experiments_leased",
    "renew": "sqlite_autoindex_experiments_2",
    "complete": "sqlite_autoindex_experiments_2",
    "fail": "sqlite_autoindex_experiments_2",
    "leases_of_token": "sqlite_autoindex_experiments_2",
    "leases_of_worker": "experiments_lease_owner",
    "release": None,
    "attempt_end": "sqlite_autoindex_attempts_1",
    "attempt_of_lease": "sqlite_autoindex_attempts_1",
    "config_unfinished": "experiments_config_status",
    "config_first_claim": None,
    "config_finish": None,
    "pending_provision": "configs_provisioning",
    "worker_seen": None,
    "worker_renewed": None,
}


def test_every_hot_statement_is_an_index_seek(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 2_000))
    for n in range(200):  # some of every status, so that the statistics see a run under way
        experiment = claim(store, f"w{n}")["experiment"]
        if n % 2:
            store.complete(experiment["lease_token"], {}, 1.0, now=T0 + 1)
    store.conn.execute("ANALYZE")
    for name, index in HOT_STATEMENTS.items():
        plan = store.query_plan(name)
        seeks = [line for line in plan if line.startswith("SEARCH")]
        assert seeks, (name, plan)
        assert not [line for line in plan if line.startswith("SCAN") and line != "SCAN CONSTANT ROW"], (name, plan)
        assert not [line for line in plan if "TEMP B-TREE" in line], (name, plan)
        if index is not None:
            assert any(f"INDEX {index} (" in line for line in seeks), (name, plan)


def sqlite_steps(store, call):
    """SQLite virtual-machine steps (in hundreds) a store call takes: a count, not a timing."""
    steps = [0]

    def count():
        steps[0] += 1
    store.conn.set_progress_handler(count, 100)
    try:
        call()
    finally:
        store.conn.set_progress_handler(None, 0)
    return steps[0]


@pytest.mark.parametrize("transition", ["claim", "release"])
def test_claim_and_release_do_not_walk_every_live_lease(make_store, transition):
    """A claim checks whether its worker already holds a lease, a release finds the worker's
    leases: with 4,000 live leases each must cost about what it costs with 4."""
    store = make_store(grid([(2, 4)], 4_100))

    def cost(live):
        with store.batch():
            for n in range(live):
                store.claim(f"holder-{live}-{n}", 2, 4, now=T0, lease_seconds=LEASE)
        if transition == "claim":
            return sqlite_steps(store, lambda: store.claim(f"new-{live}", 2, 4, now=T0, lease_seconds=LEASE))
        return sqlite_steps(store, lambda: store.release(now=T0, reason="test", worker_id=f"holder-{live}-0"))

    few, many = cost(4), cost(4_000)
    assert many <= 2 * few + 20, (few, many)


def test_check_constraints_refuse_unknown_states(make_store):
    import sqlite3

    store = make_store(grid([(2, 4)], 1))
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("UPDATE experiments SET status = 'RUNNING'")
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("UPDATE configs SET state = 'BUSY'")
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("UPDATE experiments SET status = 'STARTED'")  # a lease needs a token
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_status_counts_match_rows(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 3))
    exp = claim(store)["experiment"]
    store.complete(exp["lease_token"], {}, 1.0, now=T0 + 1)
    status = store.status(now=T0 + 1)
    assert status["totals"]["total"] == 6 and status["totals"]["done"] == 1
    assert status["totals"]["not_started"] == 5
    first = status["configs"][0]
    assert {k: first[k] for k in ("name", "cores", "memory_gb", "state")} == \
        {"name": "c2-m4", "cores": 2, "memory_gb": 4, "state": "RUNNING"}
    for field in ("total", "not_started", "started", "done", "error", "interrupted", "failed", "legacy"):
        assert field in first and field in status["totals"]


def test_a_worker_claiming_again_gets_the_lease_it_already_holds(make_store):
    store = make_store(grid([(2, 4)], 3))
    first = claim(store, "w1")["experiment"]  # suppose this answer never reached w1
    again = claim(store, "w1", at=T0 + 10)["experiment"]
    assert again["lease_token"] == first["lease_token"] and again["attempt"] == 1
    assert row(store, first["key"])["lease_expires_at"] == T0 + 10 + LEASE
    assert len(store.attempts()) == 1
    other = claim(store, "w2", at=T0 + 11)["experiment"]
    assert other["key"] != first["key"]

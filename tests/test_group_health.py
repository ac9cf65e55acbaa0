"""A group that cannot run (issue 14, group health on the hand-off path): the provisioner records
why (`group_failed`), removes the group, and the server gives the provisioning lease up until a
retry it backs off, so nobody tries again in a hot loop; `status` and the dashboard say why."""

import sqlite3
import time

import pytest

from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.dashboard import render_page
from sdm_peer.errors import LeaseLost, ProviderError
from sdm_peer.overview import overview
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.run import provision_groups
from sdm_peer.settings import GROUP_RETRY_SECONDS
from sdm_peer.store import SCHEMA_VERSION, Store, schema_sql
from sdm_peer.worker import Worker

from .conftest import T0, claim, grid
from .fake_gce import FakeCompute
from .runs import init, sdm, shape_rows, start_server, with_store

FIRST, LONGEST = GROUP_RETRY_SECONDS
CAUSE = "managed instance group sdm-r-c2-m4 cannot make VMs: quota N2_CPUS exceeded (limit 0 in region us-central1)"


@pytest.fixture
def handed_off(make_store):
    """A store whose first config is done and whose second (c2-m4) is handed to w1."""
    store = make_store(grid([(1, 1), (2, 4)], 1), provider="local")
    experiment = claim(store, shape=(1, 1))["experiment"]
    provision = store.complete(experiment["lease_token"], {}, 1.0, now=T0)["provision"]
    assert provision["config"] == "c2-m4"
    return store, provision


def provisioning_lease(store):
    return store.conn.execute("SELECT provision_owner, provision_token, provision_expires_at FROM configs"
                              " WHERE name = 'c2-m4'").fetchone()


# ---------------------------------------------------------------- the store

def test_a_failed_group_gives_the_lease_up_until_the_first_retry(handed_off):
    store, provision = handed_off
    assert store.group_failed(provision["provision_token"], CAUSE, now=T0 + 5, worker_id="w1") == \
        {"retry_seconds": FIRST}
    owner, token, expires = provisioning_lease(store)
    assert owner is None and token != provision["provision_token"] and expires == T0 + 5 + FIRST
    assert store.config_state("c2-m4") == st.PROVISIONING
    [event] = store.events(kind="group_failed")
    assert (event["config"], event["worker"], event["detail"]) == \
        ("c2-m4", "w1", {"error": CAUSE, "retry_seconds": FIRST})


def test_the_old_holder_can_neither_renew_nor_report_after_giving_up(handed_off):
    store, provision = handed_off
    store.group_failed(provision["provision_token"], CAUSE, now=T0 + 5)
    for report in (lambda: store.renew(now=T0 + 6, lease_seconds=60, provision_token=provision["provision_token"]),
                   lambda: store.provisioned(provision["provision_token"], now=T0 + 6),
                   lambda: store.group_failed(provision["provision_token"], CAUSE, now=T0 + 6)):
        with pytest.raises(LeaseLost):
            report()


def test_nobody_takes_the_provisioning_over_before_the_retry(handed_off):
    store, provision = handed_off
    store.group_failed(provision["provision_token"], CAUSE, now=T0 + 5)
    early = claim(store, "w2", shape=(1, 1), at=T0 + 5 + FIRST - 1)
    assert early["provision"] is None and early["handoff_pending"] and early["retry_after"] == 1
    assert store.acquire_provisioning("bootstrap", now=T0 + 5 + FIRST - 1)["provision"] is None
    retry = claim(store, "w2", shape=(1, 1), at=T0 + 5 + FIRST)["provision"]
    assert retry["config"] == "c2-m4" and retry["provision_token"] != provision["provision_token"]


def test_each_further_failure_waits_twice_as_long_up_to_the_cap(handed_off):
    store, provision = handed_off
    at, waits = T0, []
    for _ in range(8):
        waits.append(store.group_failed(provision["provision_token"], CAUSE, now=at)["retry_seconds"])
        at += waits[-1]
        provision = store.acquire_provisioning("bootstrap", now=at)["provision"]
    assert waits == [min(FIRST * 2 ** n, LONGEST) for n in range(8)] and waits[-1] == LONGEST


def test_a_group_made_at_last_starts_the_count_again_and_clears_the_cause(handed_off):
    store, provision = handed_off
    store.group_failed(provision["provision_token"], CAUSE, now=T0)
    assert [p["error"] for p in store.provisioning(now=T0 + 1)] == [CAUSE]
    provision = store.acquire_provisioning("bootstrap", now=T0 + FIRST)["provision"]
    store.provisioned(provision["provision_token"], now=T0 + FIRST + 1)
    assert [p["error"] for p in store.provisioning(now=T0 + FIRST + 2)] == [None]
    # A later failure of the same config (its plan reopened it, say) waits the first wait again.
    store.conn.execute("UPDATE configs SET provision_token = 'again', provision_expires_at = ?"
                       " WHERE name = 'c2-m4'", (T0 + 500,))
    assert store.group_failed("again", CAUSE, now=T0 + 100)["retry_seconds"] == FIRST


def test_status_and_the_dashboard_say_why_and_when(handed_off):
    store, provision = handed_off
    store.group_failed(provision["provision_token"], CAUSE, now=T0 + 5, worker_id="w1")
    status = overview(store, now=T0 + 35)
    [entry] = status["provisioning"]
    assert entry == {"config": "c2-m4", "owner": None, "seconds_left": FIRST - 30, "error": CAUSE}
    page = render_page(status, now=T0 + 35)
    assert f"provisioning c2-m4 (retry in 30s); last try: {CAUSE}" in page
    assert "group c2-m4 cannot run by w1: " + CAUSE in page  # the events feed


# ---------------------------------------------------------------- a database of the previous version

def test_an_older_database_accepts_the_new_event_kind_and_keeps_its_events(tmp_path):
    old_schema = schema_sql().replace(" 'group_failed',", "")
    assert old_schema != schema_sql()
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO events (at, kind, config) VALUES (?, 'server_started', NULL)", (T0,))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("INSERT INTO events (at, kind, config) VALUES (?, 'group_failed', 'c')", (T0,))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.commit()
    conn.close()
    with Store(path) as store:  # upgraded on opening
        store.conn.execute("INSERT INTO events (at, kind, config) VALUES (?, 'group_failed', 'c')", (T0 + 1,))
        assert [event["kind"] for event in store.events()] == ["server_started", "group_failed"]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store.conn.execute("DELETE FROM events")
        objects = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'events'")}
        assert objects == {"events", "events_append_only_update", "events_append_only_delete", "events_handoff_from",
                           "events_of_config"}
        assert store.integrity_check() == ["ok"]
    with Store(path) as store:  # opening it again changes nothing
        assert len(store.events()) == 2


# ---------------------------------------------------------------- with the fake Compute Engine

SETTINGS = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "r"}


@pytest.fixture
def served(run, monkeypatch):
    fake = FakeCompute(retry_delay=0.05).start()
    init(run, shape_rows((1, 1), 1) + shape_rows((2, 4), 1), **SETTINGS)
    server = start_server(run)
    client = Client.for_run_dir(run)
    provider = GceProvider(SETTINGS, "the-token", api=ComputeApi("my-proj", "us-central1-a", endpoint=fake.address,
                                                                 retry_seconds=5.0, retry_wait=(0.01, 0.05)))
    yield run, fake, client, provider
    client.close()
    server.terminate()
    server.wait(timeout=15)
    fake.stop()


def hand_off(client):
    """w1 finishes c1-m1: the answer hands it the provisioning of c2-m4."""
    experiment = client.call("claim", worker_id="w1", cores=1, memory_gb=1)["experiment"]
    return client.call("complete", lease_token=experiment["lease_token"], result={}, wall_seconds=1.0)["provision"]


def test_a_quota_starved_hand_off_records_why_removes_the_group_and_backs_off(served):
    run, fake, client, provider = served
    fake.quotas["N2_CPUS"] = 0.0
    provision = hand_off(client)
    worker = Worker(client, ["true"], worker_id="w1", cores=1, memory_gb=1, work_root=run.work,
                    provider_for=lambda settings: provider)
    worker.provision(provision)
    assert "sdm-r-c2-m4" not in fake.groups and "sdm-r-c2-m4" not in fake.templates
    assert fake.calls("DELETE", "instanceGroupManagers/sdm-r-c2-m4$")
    [event] = with_store(run, lambda store: store.events(kind="group_failed"))
    assert (event["config"], event["worker"], event["detail"]["error"]) == ("c2-m4", "w1", CAUSE)
    assert not with_store(run, lambda store: store.events(kind="group_provisioned"))
    # Not before the backoff: another worker asking now is told to wait, not given the lease.
    answer = client.call("claim", worker_id="w2", cores=1, memory_gb=1)
    assert answer["provision"] is None and answer["handoff_pending"]
    assert FIRST - 5 < answer["retry_after"] <= FIRST
    shown = " ".join(sdm("status", "--dir", run.path).stdout.split())  # as wrapped to the terminal, unwrapped
    assert "provisioning c2-m4 (retry in" in shown and "quota N2_CPUS exceeded (limit 0 in region us-central1)" in shown
    [entry] = client.call("status")["provisioning"]
    assert entry["error"] == CAUSE and entry["owner"] is None


def test_bootstrap_reports_a_group_that_cannot_run_the_same_way(served):
    run, fake, client, provider = served
    fake.stockouts.add("us-central1-a")
    with pytest.raises(ProviderError, match="zone us-central1-a is out of capacity") as refused:
        provision_groups(client, provider, owner="bootstrap")
    assert "the group was removed and the run tries it again in 1m00s" in str(refused.value)
    assert "another zone" in refused.value.hint
    assert "sdm-r-c1-m1" not in fake.groups
    [event] = with_store(run, lambda store: store.events(kind="group_failed"))
    assert (event["config"], event["worker"]) == ("c1-m1", "bootstrap")
    assert client.call("acquire_provisioning", owner="bootstrap")["provision"] is None  # not before the retry


def test_a_group_that_runs_is_reported_provisioned(served):
    run, fake, client, provider = served
    provision_groups(client, provider, owner="bootstrap")
    assert "sdm-r-c1-m1" in fake.groups
    assert [e["config"] for e in with_store(run, lambda store: store.events(kind="group_provisioned"))] == ["c1-m1"]
    assert not with_store(run, lambda store: store.events(kind="group_failed"))

"""Idle accounting (issue 9) on a known database: workers' seconds alive against seconds running
a command, per config, in the store, the overview (`status --json`), the terminal view and the report."""

import json

import pytest

from sdm_peer.overview import overview

from .conftest import LEASE, T0, grid
from .test_report import Tables, invoke

A, B, C = (1, 2), (2, 4), (4, 8)


def known_run(make_store):
    """c1-m2: w1 and w2, each one 10 s experiment, w1 then waits 30 s more (alive 0-40 and 0-10 s:
    50 s alive, 20 busy). c2-m4: w3 runs 3 s, fails, runs 5 s (alive 0-20 s, 8 busy). c4-m8: nobody."""
    store = make_store(grid([A], 2) + grid([B], 1) + grid([C], 1))
    for worker in ("w1", "w2"):
        token = store.claim(worker, *A, now=T0, lease_seconds=LEASE)["experiment"]["lease_token"]
        store.complete(token, {}, 10.0, now=T0 + 10)
    store.claim("w1", *A, now=T0 + 40, lease_seconds=LEASE)  # nothing left: an idle ask
    token = store.claim("w3", *B, now=T0, lease_seconds=LEASE)["experiment"]["lease_token"]
    store.fail(token, "boom", 1, 3.0, now=T0 + 3)
    token = store.claim("w3", *B, now=T0 + 3, lease_seconds=LEASE)["experiment"]["lease_token"]
    store.complete(token, {}, 5.0, now=T0 + 8)
    store.claim("w3", *B, now=T0 + 20, lease_seconds=LEASE)
    return store


def test_store_counts_alive_and_busy_seconds_per_config(make_store):
    accounting = known_run(make_store).idle_accounting(now=T0 + 60)
    assert accounting == [
        {"config": "c1-m2", "workers": 2, "worker_seconds": 50.0, "busy_seconds": 20.0, "idle_fraction": 0.6},
        {"config": "c2-m4", "workers": 1, "worker_seconds": 20.0, "busy_seconds": 8.0, "idle_fraction": 0.6},
        {"config": "c4-m8", "workers": 0, "worker_seconds": 0.0, "busy_seconds": 0.0, "idle_fraction": None}]


def test_a_running_attempt_counts_as_busy_until_now(make_store):
    store = make_store(grid([A], 1))
    token = store.claim("w1", *A, now=T0, lease_seconds=LEASE)["experiment"]["lease_token"]
    store.renew(lease_token=token, now=T0 + 20, lease_seconds=LEASE)
    [row] = store.idle_accounting(now=T0 + 20)
    assert (row["worker_seconds"], row["busy_seconds"], row["idle_fraction"]) == (20.0, 20.0, 0.0)


def test_overview_carries_it_per_config_and_in_total(make_store):
    status = json.loads(json.dumps(overview(known_run(make_store), now=T0 + 60, with_replication=False)))
    first = status["configs"][0]
    assert (first["workers_seen"], first["worker_seconds"], first["busy_seconds"], first["idle_fraction"]) == \
        (2, 50.0, 20.0, 0.6)
    assert status["idle"] == {"workers_seen": 3, "worker_seconds": 70.0, "busy_seconds": 28.0,
                              "idle_fraction": pytest.approx(0.6)}
    assert status["totals"]["total"] == 4  # the contract's fields are all still there


def test_status_and_report_show_it(make_store, tmp_path):
    store = known_run(make_store)
    shown = invoke("status", "--db", store.path)
    assert shown.exit_code == 0, shown.output
    assert "workers: 3 seen" in shown.output and "% idle" in shown.output
    assert invoke("report", "--db", store.path, "--out", tmp_path / "out").exit_code == 0
    table = Tables((tmp_path / "out" / "report.html").read_text()).tables["idle"]
    assert table[1:] == [["c1-m2", "2", "50.0", "20.0", "60.0%"], ["c2-m4", "1", "20.0", "8.00", "60.0%"],
                         ["c4-m8", "0", "0.00", "0.00", "–"], ["all", "3", "70.0", "28.0", "60.0%"]]


def test_the_dashboard_page_shows_it(make_store):
    from sdm_peer.dashboard import render_page

    page = render_page(overview(known_run(make_store), now=T0 + 60, with_replication=False), now=T0 + 60)
    assert '<p id="idle">workers: 3 seen, alive 1m10s, running commands 28s: 60% idle</p>' in page

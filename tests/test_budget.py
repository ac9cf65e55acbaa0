"""A hard budget (DESIGN §8): spend counted from each worker's seconds alive (a minute at least)
at its shape's price; at budget_usd nothing is claimed or provisioned, the run says why in an
event and in status; a raised cap resumes it."""

import json

import pytest

from sdm_peer import prices
from sdm_peer import states as st
from sdm_peer.overview import account_text, overview
from sdm_peer.plan import Plan
from sdm_peer.providers.base import CAPACITY
from sdm_peer.run import bootstrap

from .conftest import T0, claim, grid
from .runs import all_done, attempts, experiments, init, job_command, processes_of, sdm, shape_rows, status, wait_for
from .test_e2e_local import assert_done_exactly_once, events

# A dollar per vCPU-hour on this machine: a 2-core worker alive a minute costs $2/60.
DEAR = {"local": {"vcpu_hour": 1.0, "gb_hour": 0.0}}


def test_the_built_in_prices_are_dated_and_overridden_entry_by_entry():
    table = prices.price_table({"n2": {"spot_vcpu_hour": 0.01}, "local": {"vcpu_hour": 2.0}})
    assert prices.PRICES_DATE and table["n2"]["spot_vcpu_hour"] == 0.01
    assert table["n2"]["vcpu_hour"] == prices.PRICES["n2"]["vcpu_hour"]
    assert prices.hourly(table, "local", 4, 16, spot=False) == 8.0
    assert prices.hourly(prices.price_table(), "local", 4, 16, spot=True) == 0.0


def test_at_the_cap_nothing_is_claimed_or_provisioned_and_a_raised_cap_resumes(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 3), provider="local", max_vcpus=2, prices=DEAR, budget_usd=0.05)
    (first,) = store.acquire_provisioning("bootstrap", now=T0)["provisions"]
    running = claim(store, "w1", (2, 4), T0)["experiment"]
    # w1 alive 60 s (the minimum): $0.033, under the cap.
    assert claim(store, "w1", (2, 4), T0)["stop"] is None
    later = T0 + 120  # w1 alive 2 minutes, w2 one: $0.10, over $0.05
    store.renew(lease_token=running["lease_token"], now=later, lease_seconds=60)
    answer = claim(store, "w2", (2, 4), later)
    assert answer["experiment"] is None and "budget is spent" in answer["stop"]
    assert answer["remove_group"] is False  # w1 still runs one: w2 only leaves the group
    finished = store.complete(running["lease_token"], {}, 1.0, now=later)
    assert finished["provisions"] == []
    assert claim(store, "w1", (2, 4), later)["remove_group"] is True
    (event,) = store.events(kind="budget")
    assert event["detail"]["stopped"] is True and event["detail"]["budget_usd"] == 0.05
    status = overview(store, now=later)
    assert status["spend"]["budget_usd"] == 0.05 and status["spend"]["stopped"] is True
    assert status["spend"]["usd"] >= 0.05 and status["spend"]["projected_usd"] > status["spend"]["usd"]
    assert "budget reached" in account_text(status)
    # `bootstrap --set budget_usd=...` stores the new cap; the running store reads it at once.
    store.import_plan(Plan(), settings={"budget_usd": 10.0}, now=later)
    assert claim(store, "w1", (2, 4), later)["experiment"] is not None
    assert [e["detail"]["stopped"] for e in store.events(kind="budget")] == [True, False]
    assert first["config"] == "c2-m4"


def test_a_group_made_standard_after_spot_fallback_minutes_is_priced_standard(make_store):
    # $1 per vCPU-hour standard, a quarter of it spot, in every family (the database VM's too).
    flat = {family: {"vcpu_hour": 1.0, "gb_hour": 0.0, "spot_vcpu_hour": 0.25, "spot_gb_hour": 0.0}
            for family in prices.PRICES}
    store = make_store(grid([(2, 4), (2, 8)], 1), provider="gce", zone="us-central1-a", max_vcpus=8,
                       spot_fallback_minutes=0, prices=flat)
    spot, made_standard = store.acquire_provisioning("bootstrap", now=T0)["provisions"]
    moved = store.group_failed(made_standard["provision_token"], "no spot capacity", cause=CAPACITY, now=T0)
    assert moved["provision"]["standard"] is True and spot["standard"] is False
    claim(store, "w-spot", (2, 4), T0 + 10)
    claim(store, "w-standard", (2, 8), T0 + 10)
    # Each worker's first minute: 2 vCPUs spot, 2 standard; and the e2-small database VM's 10 s.
    expected = 2 * 0.25 / 60 + 2 * 1.0 / 60 + 0.5 * 1.0 * 10 / 3600
    assert store.spend(now=T0 + 10)["usd"] == pytest.approx(expected, abs=1e-4)


# A worker of one core costs $1 for its first minute; the run's workers live seconds, so the
# spend is a dollar per worker the server has seen.
DOLLAR_A_WORKER = {"local": {"vcpu_hour": 60.0}}
A, B, C, D = (1, 1), (1, 2), (1, 3), (1, 4)


def test_a_local_run_stops_at_its_budget_and_bootstrap_with_a_raised_cap_resumes_it(run, tmp_path):
    # max_vcpus=2, groups of one: bootstrap starts A and B ($2). B's one experiment runs until
    # the test opens its gate; A's ends once B's runs, and A hands off to C, whose worker is the
    # third seen: $3 of a $2.50 budget. C's worker claims nothing; D would fit once B is done.
    gate, b_running = tmp_path / "gate", tmp_path / "b-running"
    rows = (shape_rows(A, 1, 1, wait_for=str(b_running)) + shape_rows(B, 1, 1, touch=str(b_running),
                                                                       wait_for=str(gate))
            + shape_rows(C, 2, 1) + shape_rows(D, 1, 1))
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2, max_vcpus=2,
         prices=DOLLAR_A_WORKER, budget_usd=2.5)
    bootstrap(run)
    server_pid = run.server_info()["pid"]

    def running_besides_the_server(but=()):
        return [command for pid, command in processes_of(run.path)
                if pid != server_pid and not any(name in command for name in but)]

    # At the cap the groups with nothing running are removed; B's worker goes on with its experiment.
    wait_for(lambda: [e["detail"]["stopped"] for e in events(run, "budget")] == [True], what="the budget stop")
    wait_for(lambda: not running_besides_the_server(but=["c1-m2"]), what="the groups of A and C removed")
    assert [e["status"] for e in experiments(run)] == [st.DONE, st.STARTED, st.NOT_STARTED, st.NOT_STARTED,
                                                     st.NOT_STARTED]
    assert len(attempts(run)) == 2
    assert {e["config"] for e in events(run, "group_provisioned")} == {"c1-m1", "c1-m2", "c1-m3"}

    gate.touch()
    wait_for(lambda: not running_besides_the_server(), what="B's worker done and its group removed")
    states = {config["name"]: config["state"] for config in status(run)["configs"]}
    assert states == {"c1-m1": st.CONFIG_DONE, "c1-m2": st.CONFIG_DONE, "c1-m3": st.PROVISIONING,
                      "c1-m4": st.WAITING}  # B done with room for D: the budget, not max_vcpus, holds it
    assert [e["status"] for e in experiments(run)] == [st.DONE, st.DONE, st.NOT_STARTED, st.NOT_STARTED,
                                                     st.NOT_STARTED]
    assert sorted(a["outcome"] for a in attempts(run)) == [st.DONE, st.DONE]  # nothing claimed at the cap
    assert [e["config"] for e in events(run, "handoff")] == ["c1-m1", "c1-m2", "c1-m3"]
    assert {e["config"] for e in events(run, "group_deleted")} == {"c1-m1", "c1-m2", "c1-m3"}

    # The run says why, in status's words, its JSON and its event feed.
    text = sdm("status", "--dir", run.path).stdout
    assert "budget reached" in " ".join(text.split())
    reported = json.loads(sdm("status", "--dir", run.path, "--json").stdout)
    assert reported["spend"]["stopped"] is True and reported["spend"]["budget_usd"] == 2.5
    assert reported["spend"]["usd"] >= 2.5
    assert [e["detail"]["stopped"] for e in reported["events"] if e["kind"] == "budget"] == [True]

    # A raised cap, given to the running server by bootstrap: C's group is made again, D's too.
    sdm("bootstrap", "--plan", run.path.parent / "run-plan.json", "--provider", "local", "--dir", run.path,
        "--set", "budget_usd=100", "--", *job_command(tmp_path))
    assert run.server_info()["pid"] == server_pid
    wait_for(lambda: all_done(run), timeout=60, what="every config DONE")
    assert_done_exactly_once(run)
    assert [e["detail"]["stopped"] for e in events(run, "budget")] == [True, False]
    assert [e["config"] for e in events(run, "handoff")] == ["c1-m1", "c1-m2", "c1-m3", "c1-m4"]
    wait_for(lambda: not running_besides_the_server(), what="every group removed")
    reported = json.loads(sdm("status", "--dir", run.path, "--json").stdout)
    assert reported["spend"]["stopped"] is False and reported["spend"]["budget_usd"] == 100

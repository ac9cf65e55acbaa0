"""A hard budget (DESIGN §8): spend counted from each worker's seconds alive (a minute at least)
at its shape's price; at budget_usd nothing is claimed or provisioned, the run says why in an
event and in status; a raised cap resumes it."""

from sdm_peer import prices
from sdm_peer.overview import account_text, overview
from sdm_peer.plan import Plan

from .conftest import T0, claim, grid

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

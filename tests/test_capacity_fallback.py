"""Capacity fallback (issue 16, DESIGN §8): a group whose zone is out of capacity is made again in
the next of the run's `zones`, and after `spot_fallback_minutes` without spot capacity with
standard VMs; each move an event; the config's zone is kept, so removing its group finds it."""

import pytest

from sdm_peer.client import Client
from sdm_peer.errors import BadInput
from sdm_peer.overview import event_text
from sdm_peer.providers.base import CAPACITY, GroupSpec, check_run
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.providers.gce.stop import delete_groups
from sdm_peer.run import provision_groups
from sdm_peer.store import capacity_fallback

from .conftest import T0, claim, grid
from .fake_gce import FakeCompute
from .runs import init, shape_rows, start_server, with_store

A, B, C = "us-central1-a", "us-central1-b", "us-central1-c"
SETTINGS = {"provider": "gce", "project": "my-proj", "zone": A, "run_name": "r", "zones": [A, B, C]}
GROUP = "sdm-r-c1-m1"


def test_the_next_zone_then_standard_vms_once_spot_fallback_minutes_have_passed():
    settings = {**SETTINGS, "spot_fallback_minutes": 10}
    assert capacity_fallback(settings, None, False, 0) == (B, False, "zone_fallback", {"from": A, "to": B})
    assert capacity_fallback(settings, B, False, 0)[:2] == (C, False)
    assert capacity_fallback(settings, C, False, 599) is None  # every zone tried: wait, then from A again
    assert capacity_fallback(settings, C, False, 600) == (A, True, "spot_fallback", {"seconds": 600, "zone": A})
    assert capacity_fallback(settings, C, True, 6000) is None  # standard already
    assert capacity_fallback({**settings, "spot": False}, C, False, 6000) is None
    assert capacity_fallback({"zone": A}, None, False, 6000) is None  # one zone, no spot fallback


def test_zones_outside_the_region_of_zone_are_refused_at_init():
    with pytest.raises(BadInput, match="zones europe-west1-b are not in the region of zone us-central1-a"):
        check_run({**SETTINGS, "zones": [A, "europe-west1-b"]}, [(1, 1)])


def test_the_store_keeps_the_lease_and_says_where_to_try_now(make_store):
    store = make_store(grid([(1, 1), (2, 4)], 1), provider="local", zone=A, zones=[A, B])
    provision = store.complete(claim(store, shape=(1, 1))["experiment"]["lease_token"], {}, 1.0, now=T0)["provision"]
    assert (provision["zone"], provision["standard"]) == (None, False)
    moved = store.group_failed(provision["provision_token"], "out of capacity", cause=CAPACITY, now=T0 + 5)
    assert moved["retry_seconds"] == 0
    assert (moved["provision"]["zone"], moved["provision"]["provision_token"]) == (B, provision["provision_token"])
    [event] = store.events(kind="zone_fallback")
    assert event["detail"] == {"from": A, "to": B, "cause": "out of capacity"}
    assert event_text({**event, "key": None}) == "group c2-m4 moved from zone us-central1-a to us-central1-b: " \
                                                 "out of capacity"
    # B out of capacity too: the lease is given up until the retry, which starts at A again.
    given_up = store.group_failed(provision["provision_token"], "out of capacity", cause=CAPACITY, now=T0 + 9)
    assert "provision" not in given_up and given_up["retry_seconds"] > 0
    assert [c["zone"] for c in store.status(now=T0 + 9)["configs"]] == [None, None]


@pytest.fixture
def served(run):
    fake = FakeCompute(retry_delay=0.05).start()
    init(run, shape_rows((1, 1), 1), **SETTINGS, spot_fallback_minutes=0.001)
    server = start_server(run)
    client = Client.for_run_dir(run)
    settings = {**SETTINGS, "spot_fallback_minutes": 0.001}
    api = ComputeApi("my-proj", A, endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))
    yield run, fake, client, GceProvider(settings, "the-token", api=api), api
    client.close()
    server.terminate()
    server.wait(timeout=15)
    fake.stop()


def test_a_group_out_of_capacity_is_made_in_the_next_zone_and_found_there(served):
    run, fake, client, provider, api = served
    fake.stockouts.update({A, B})
    provision_groups(client, provider, owner="bootstrap")
    assert fake.groups[GROUP]["zone"] == C
    assert [(e["detail"]["from"], e["detail"]["to"]) for e in with_store(run, lambda s: s.events(kind="zone_fallback"))
            ] == [(A, B), (B, C)]
    assert all("out of capacity" in e["detail"]["cause"] for e in with_store(run, lambda s: s.events(kind="zone_fallback")))
    [config] = client.call("status")["configs"]
    assert config["zone"] == C and config["state"] == "PROVISIONING"
    # The groups left in A and B were removed; leaving and removing find the group in C.
    assert fake.calls("DELETE", f"zones/{A}/instanceGroupManagers/{GROUP}$")
    provider.leave_group(GroupSpec("c1-m1"), fake.members(GROUP)[0])
    assert fake.groups[GROUP]["targetSize"] == 0
    assert delete_groups(provider.settings, ["c1-m1"], api) == ["c1-m1"]
    assert fake.groups == {} and fake.templates == {}


def test_no_spot_capacity_anywhere_for_long_enough_makes_the_group_standard(served):
    run, fake, client, provider, api = served
    fake.spot_stockouts.update({A, B, C})
    provision_groups(client, provider, owner="bootstrap")
    assert fake.groups[GROUP]["zone"] == A
    assert fake.templates[GROUP]["properties"]["scheduling"]["provisioningModel"] == "STANDARD"
    [event] = with_store(run, lambda s: s.events(kind="spot_fallback"))
    assert event["detail"]["zone"] == A and event["detail"]["seconds"] > 0
    [config] = client.call("status")["configs"]
    assert config["standard"] is True and config["zone"] == A

"""Pre-warming and shrinking (issue 9) in the store: the hand-off at the last claim, exactly once
and in order; who may leave a group with nothing to claim."""

from hypothesis import given, settings as hypothesis_settings, strategies

from sdm_peer import states as st
from sdm_peer.errors import LeaseLost
from sdm_peer.providers.base import Provider

from .conftest import LEASE, T0, claim, grid


def started(store, rows, **settings):
    """A store whose first config's group was provisioned by `bootstrap`."""
    store = store(rows, provider="local", **settings)
    store.provisioned(store.acquire_provisioning("bootstrap", now=T0)["provision"]["provision_token"], now=T0)
    return store


def handoffs(store):
    return [(event["config"], event["detail"].get("from")) for event in store.events(kind="handoff")]


def states(store):
    return {config["name"]: config["state"] for config in store.status(now=T0)["configs"]}


def test_the_last_claim_hands_off_the_next_config_and_the_finish_does_not_again(make_store):
    store = started(make_store, grid([(2, 4), (4, 8), (8, 16)], 2), prewarm=True)
    first = claim(store, "w1")
    assert first["provision"] is None  # one claimable experiment is left
    last = claim(store, "w2")
    provision = last["provision"]
    assert provision["config"] == "c4-m8" and provision["previous"] == "c2-m4"
    assert states(store) == {"c2-m4": "RUNNING", "c4-m8": "PROVISIONING", "c8-m16": "WAITING"}
    for answer, at in ((first, T0 + 1), (last, T0 + 2)):
        assert store.complete(answer["experiment"]["lease_token"], {}, 1.0, now=at)["provision"] is None
    assert states(store)["c2-m4"] == "DONE" and states(store)["c8-m16"] == "WAITING"
    assert handoffs(store) == [("c2-m4", None), ("c4-m8", "c2-m4")]


def test_an_error_retry_after_the_prewarm_does_not_hand_off_again(make_store):
    # Documented: the retry makes the config claimable again, but its hand-off already happened.
    store = started(make_store, grid([(2, 4), (4, 8), (8, 16)], 1), prewarm=True)
    answer = claim(store, "w1")
    assert answer["provision"]["config"] == "c4-m8"
    store.fail(answer["experiment"]["lease_token"], "boom", 1, 1.0, now=T0 + 1)
    retry = claim(store, "w1", at=T0 + 2)
    assert retry["experiment"] is not None and retry["provision"] is None
    store.complete(retry["experiment"]["lease_token"], {}, 1.0, now=T0 + 3)
    assert handoffs(store) == [("c2-m4", None), ("c4-m8", "c2-m4")]
    assert states(store) == {"c2-m4": "DONE", "c4-m8": "PROVISIONING", "c8-m16": "WAITING"}


def test_a_config_finished_by_an_expiry_budget_still_hands_off_once(make_store):
    # The last experiment runs out of interruptions: the config finishes through an expiry,
    # after the claim that pre-warmed; the finish must not hand off the config after next.
    store = started(make_store, grid([(2, 4), (4, 8)], 1), prewarm=True, max_interruptions=1)
    assert claim(store, "w1")["provision"]["config"] == "c4-m8"
    assert claim(store, "w2", at=T0 + LEASE + 1)["config_done"] is True
    assert handoffs(store) == [("c2-m4", None), ("c4-m8", "c2-m4")]


def test_without_prewarm_the_hand_off_waits_for_the_finish(make_store):
    store = started(make_store, grid([(2, 4), (4, 8)], 1))
    answer = claim(store, "w1")
    assert answer["provision"] is None and states(store)["c4-m8"] == "WAITING"
    assert store.complete(answer["experiment"]["lease_token"], {}, 1.0, now=T0 + 1)["provision"]["config"] == "c4-m8"


def test_prewarm_with_provider_none_hands_out_nothing(make_store):
    store = make_store(grid([(2, 4), (4, 8)], 1), prewarm=True)
    assert claim(store, "w1")["provision"] is None and handoffs(store) == []


# ---------------------------------------------------------------- shrinking

def test_idle_workers_leave_until_one_reserve_is_left(make_store):
    store = started(make_store, grid([(2, 4)], 3), shrink=True)
    running = [claim(store, worker) for worker in ("w1", "w2", "w3")]
    assert all(answer["leave"] is False for answer in running)
    store.complete(running[0]["experiment"]["lease_token"], {}, 1.0, now=T0 + 1)
    store.complete(running[1]["experiment"]["lease_token"], {}, 1.0, now=T0 + 1)
    # w1 and w2 are idle (a worker that just reported counts): one may go, the other stays.
    first_idle = claim(store, "w1", at=T0 + 2)
    assert first_idle["experiment"] is None and first_idle["leave"] is True
    assert claim(store, "w2", at=T0 + 3)["leave"] is False  # the reserve while w3 runs
    assert claim(store, "w2", at=T0 + 4)["leave"] is False
    # w3 is preempted: its lease lapses and the reserve re-runs it at once.
    rerun = claim(store, "w2", at=T0 + LEASE + 1)
    assert rerun["experiment"] is not None and rerun["experiment"]["attempt"] == 2


def test_a_worker_that_asks_again_after_leaving_counts_again(make_store):
    store = started(make_store, grid([(2, 4)], 2), shrink=True)
    a, b = claim(store, "w1"), claim(store, "w2")
    store.complete(a["experiment"]["lease_token"], {}, 1.0, now=T0 + 1)
    assert claim(store, "w3", at=T0 + 1)["leave"] is True  # a third worker, idle with w1
    assert claim(store, "w1", at=T0 + 2)["leave"] is False  # w3 has left: w1 is the reserve
    # w3's provider refused to remove it: it asks again and is one of the idle ones again.
    assert claim(store, "w3", at=T0 + 3)["leave"] is True
    assert claim(store, "w1", at=T0 + 4)["leave"] is False
    assert b["leave"] is False


def test_workers_gone_silent_for_a_lease_period_are_not_the_reserve(make_store):
    store = started(make_store, grid([(2, 4)], 2), shrink=True)
    claim(store, "w1")
    claim(store, "w2")  # holds the last one; w1 vanishes still holding its lease
    idle = claim(store, "w3", at=T0 + 1)
    assert idle["leave"] is False  # w3 alone is idle


def test_without_shrink_nobody_is_told_to_leave(make_store):
    store = started(make_store, grid([(2, 4)], 1))
    claim(store, "w1")
    assert claim(store, "w2")["leave"] is False and claim(store, "w3")["leave"] is False


# ---------------------------------------------------------------- a property

@hypothesis_settings(max_examples=30, deadline=None)
@given(steps=strategies.lists(strategies.tuples(strategies.sampled_from(["claim", "complete", "fail", "lapse"]),
                                                strategies.integers(0, 3)), max_size=60))
def test_prewarm_hands_off_each_config_once_and_in_order(tmp_path_factory, steps):
    from sdm_peer.plan import read_plan
    from sdm_peer.store import Store

    from .conftest import write_plan

    directory = tmp_path_factory.mktemp("prewarm")
    shapes = [(2, 4), (4, 8), (8, 16)]
    store = Store(directory / "run.db")
    store.import_plan(read_plan(write_plan(directory / "plan.json", grid(shapes, 2))),
                      settings={"provider": "local", "prewarm": True, "max_failures": 2}, now=T0)
    store.acquire_provisioning("bootstrap", now=T0)
    now, held = T0, []
    for action, worker in steps:
        now += 1
        # Workers exist only where a group was handed off (provisioned or being provisioned).
        live = [shape for shape, config in zip(shapes, store.status(now=now)["configs"])
                if config["state"] != st.WAITING]
        shape = live[worker % len(live)]
        if action == "claim":
            answer = store.claim(f"w{worker}", *shape, now=now, lease_seconds=LEASE)
            if answer["experiment"]:
                held.append(answer["experiment"]["lease_token"])
        elif action == "lapse":
            now += LEASE
        elif held:
            token = held.pop(0)
            try:
                if action == "complete":
                    store.complete(token, {}, 1.0, now=now)
                else:
                    store.fail(token, "x", 1, 1.0, now=now)
            except LeaseLost:
                pass  # it lapsed meanwhile and was taken back
        handed = [event["config"] for event in store.events(kind="handoff")]
        assert handed == ["c2-m4", "c4-m8", "c8-m16"][:len(handed)]  # in order, each once
        # Configs start in plan order: no config has left WAITING while an earlier one waits.
        config_states = [config["state"] for config in store.status(now=now)["configs"]]
        waiting = [state == st.WAITING for state in config_states]
        assert waiting == sorted(waiting)
    store.close()


def test_a_worker_keeps_its_fresh_lease_alive_while_it_provisions_the_next_group(tmp_path):
    """With pre-warming one answer carries an experiment and a provisioning lease: creating a
    cloud group can outlast the lease period, so the lease is renewed meanwhile."""
    import threading

    from sdm_peer.worker import Worker

    calls = []
    renewed_twice = threading.Event()

    class Client:
        def call(self, op, retry_seconds=None, **args):
            calls.append((op, args))
            if [op for op, _ in calls].count("renew") >= 2:
                renewed_twice.set()
            if "leases" in args:
                return {"leases": [{**lease, "ok": True, "lease_seconds_left": 1} for lease in args["leases"]]}
            return {}

    class SlowProvider(Provider):
        def create_group(self, spec):
            assert renewed_twice.wait(10), "the lease was not renewed while the group was being made"

    worker = Worker(Client(), ["true"], worker_id="w1", cores=2, memory_gb=4, work_root=tmp_path,
                    provider_for=lambda settings: SlowProvider())
    worker.lease_seconds = 0.3  # renewed every 0.1 s
    provision = {"config": "c4-m8", "cores": 4, "memory_gb": 8, "group_size": 1, "provision_token": "p",
                 "lease_seconds_left": 300}  # not renewed in the test's fraction of a second
    worker.provision_holding([provision], {"lease_token": "t"})
    renewals = [args for op, args in calls if op == "renew"]
    both = {"leases": [{"lease_token": "t"}, {"provision_token": "p"}]}  # one request for the two leases
    assert len(renewals) >= 2 and all(args == both for args in renewals), renewals
    assert ("provisioned", {"provision_token": "p", "worker_id": "w1"}) in calls

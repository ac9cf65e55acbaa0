"""Many configurations at once (DESIGN §8): a finishing config hands off to as many WAITING
configs, in sequence order, as the free vCPUs of max_vcpus hold, in the same transaction; a
group is made smaller to fit; a group that cannot run gives its vCPUs back; a local run keeps
two configs RUNNING at once under max_vcpus=2; the last configs' templates do not outlive their
groups on Compute Engine."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as hs
from hypothesis.stateful import invariant, precondition, rule

from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.errors import BadInput
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.run import bootstrap, provision_groups
from sdm_peer.rundir import RunDir
from sdm_peer.worker import Worker

from .conftest import T0, claim, grid
from .fake_gce import FakeCompute
from .runs import all_done, init, job_command, shape_rows, start_server, status, wait_for
from .test_e2e_local import assert_done_exactly_once, events
from .test_store_properties import PER_CONFIG, SHAPES, StoreMachine, table

S2, S4, S8 = (2, 4), (4, 8), (8, 16)


def finish_config(store, shape, worker="w1", at=T0):
    """Claim and complete every experiment of a shape; the last answer."""
    while (answer := claim(store, worker, shape, at))["experiment"]:
        answer = store.complete(answer["experiment"]["lease_token"], {}, 1.0, now=at)
        if answer["config_done"]:
            return answer
    raise AssertionError("the config did not finish")


def states(store):
    return {config["name"]: (config["state"], config["vms"]) for config in store.status(now=T0)["configs"]}


def test_bootstrap_starts_as_many_configs_as_fit_in_sequence_order_each_made_smaller_to_fit(make_store):
    store = make_store(grid([S2, S4, S8, (2, 8)], 2), provider="local", group_size=2, max_vcpus=10)
    answer = store.acquire_provisioning("bootstrap", now=T0)
    # c2 takes 2 VMs (4 vCPUs), c4 the 1 VM of 4 that the 6 left hold; c8 does not fit, and
    # the run keeps sequence order: c2-m8 after it waits too.
    assert [(p["config"], p["group_size"]) for p in answer["provisions"]] == [("c2-m4", 2), ("c4-m8", 1)]
    assert answer["provision"] == answer["provisions"][0]
    assert states(store) == {"c2-m4": ("PROVISIONING", 2), "c4-m8": ("PROVISIONING", 1),
                             "c8-m16": ("WAITING", 0), "c2-m8": ("WAITING", 0)}
    assert store.vcpus() == {"limit": 10, "in_use": 8}
    assert [e["detail"] for e in store.events(kind="handoff")] == [{"from": None}, {"from": None, "vms": 1}]


def test_a_finishing_config_hands_off_to_as_many_as_its_freed_vcpus_hold(make_store):
    store = make_store(grid([S8, S2, S4, (2, 8)], 1), provider="local", max_vcpus=8)
    (first,) = store.acquire_provisioning("bootstrap", now=T0)["provisions"]
    assert first["config"] == "c8-m16"
    answer = finish_config(store, S8)
    assert [p["config"] for p in answer["provisions"]] == ["c2-m4", "c4-m8", "c2-m8"]
    assert all(p["previous"] == "c8-m16" for p in answer["provisions"])
    assert len({p["provision_token"] for p in answer["provisions"]}) == 3
    assert store.vcpus() == {"limit": 8, "in_use": 8}
    assert [e["config"] for e in store.events(kind="handoff")] == ["c8-m16", "c2-m4", "c4-m8", "c2-m8"]


def test_a_group_that_cannot_run_gives_its_vcpus_back_and_gets_them_again_as_they_fit(make_store):
    store = make_store(grid([S4, S4[:1] + (16,), S8], 1), provider="local", max_vcpus=8)
    first, second = store.acquire_provisioning("bootstrap", now=T0)["provisions"]
    store.group_failed(first["provision_token"], "quota CPUS exceeded", now=T0)
    assert store.vcpus()["in_use"] == 4  # c4-m16's group still holds its 4
    # The retry comes once its backoff lapsed, and only with vCPUs to give it.
    retry = T0 + 61
    store.provisioned(second["provision_token"], now=T0)
    taken = store.acquire_provisioning("bootstrap", now=retry)["provisions"]
    assert [(p["config"], p["group_size"]) for p in taken] == [("c4-m8", 1)]
    assert store.vcpus()["in_use"] == 8


def test_a_shape_bigger_than_max_vcpus_is_refused_before_anything_is_written(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(BadInput, match=r"max_vcpus \(2\).*: 4"):
        init(run, shape_rows((4, 4), 1) + shape_rows((1, 1), 1), provider="local", max_vcpus=2)
    assert not run.db.exists()


def test_a_local_run_keeps_two_configs_running_at_once_under_max_vcpus_2(run, tmp_path):
    rows = shape_rows((1, 1), 3, sleep=1.5) + shape_rows((1, 2), 3, sleep=1.5)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2, max_vcpus=2)
    bootstrap(run)
    wait_for(lambda: [c["state"] for c in status(run)["configs"]] == [st.RUNNING, st.RUNNING], timeout=30,
             what="both configs RUNNING at once")
    wait_for(lambda: all_done(run), timeout=60, what="every config DONE")
    assert_done_exactly_once(run)
    assert [e["detail"] for e in events(run, "handoff")] == [{"from": None}, {"from": None}]


def test_the_worker_removing_the_last_group_sweeps_the_templates_finished_configs_left(run):
    # Two configs at once on the strict fake Compute Engine; no config waits, so no provisioner
    # comes after them to sweep a template.
    settings = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "r", "max_vcpus": 8}
    fake = FakeCompute(retry_delay=0.05).start()
    init(run, shape_rows((1, 1), 1) + shape_rows((2, 4), 1), **settings)
    server = start_server(run)
    client = Client.for_run_dir(run)
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))
    provider = GceProvider(settings, "the-token", api=api)
    try:
        provision_groups(client, provider)
        assert set(fake.groups) == set(fake.templates) == {"sdm-r-c1-m1", "sdm-r-c2-m4"}
        for worker, (cores, memory_gb) in (("w1", (1, 1)), ("w2", (2, 4))):
            experiment = client.call("claim", worker_id=worker, cores=cores, memory_gb=memory_gb)["experiment"]
            assert client.call("complete", lease_token=experiment["lease_token"], result={},
                               wall_seconds=1.0)["provisions"] == []
        fake.drop_group("sdm-r-c1-m1")  # c1-m1's worker deleted its group and died with it
        assert set(fake.templates) == {"sdm-r-c1-m1", "sdm-r-c2-m4"}
        last = Worker(client, ["true"], worker_id="w2", cores=2, memory_gb=4, work_root=run.work,
                      provider_for=lambda _: provider, own_group="c2-m4")
        last.remove_own_group("c2-m4")
        assert fake.groups == {} and fake.templates == {}
        deletions = [path.rsplit("/", 1)[1] for method, path, _ in fake.requests if method == "DELETE"]
        assert deletions.index("sdm-r-c1-m1") < deletions.index("sdm-r-c2-m4")  # swept before its own went
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=15)
        fake.stop()


class ConcurrentStoreMachine(StoreMachine):
    """The state machine of test_store_properties with max_vcpus (groups of 2, made smaller to
    fit) and groups that cannot run: every hand-off still exactly once, in sequence order, and
    never more vCPUs held than max_vcpus."""

    LIMIT = 10

    def __init__(self):
        super().__init__()
        self.store.import_plan(_no_plan(), settings={"max_vcpus": self.LIMIT, "group_size": 2}, now=T0)
        self.conn.execute("UPDATE configs SET group_size = 2")

    def collect(self, answer):
        provisions = answer.get("provisions") or []
        assert answer.get("provision") == (provisions[0] if provisions else None)
        for provision in provisions:
            assert provision["provision_token"] not in self.provision_tokens
            assert 1 <= provision["group_size"] <= 2
            self.provision_tokens.append(provision["provision_token"])

    @precondition(lambda self: len(self.provision_tokens) > 1)
    @rule(data=hs.data())
    def group_failed(self, data):
        token = data.draw(hs.sampled_from(list(self.provision_tokens)))
        self.call(self.store.group_failed, token, "quota CPUS exceeded")

    @invariant()
    def never_more_vcpus_than_max_vcpus(self):
        held = self.conn.execute("SELECT COALESCE(SUM(cores * vms), 0) FROM configs"
                                 " WHERE state IN ('PROVISIONING', 'RUNNING')").fetchone()[0]
        assert held <= self.LIMIT
        assert self.store.vcpus() == {"limit": self.LIMIT, "in_use": held}

    @invariant()
    def hand_offs_come_in_sequence_order(self):
        sequence = {row["name"]: row["sequence"] for row in table(self.conn, "configs").values()}
        order = [sequence[config] for (config,) in self.conn.execute(
            "SELECT config FROM events WHERE kind = 'handoff' ORDER BY id")]
        assert order == sorted(order) and len(order) == len(set(order))


def _no_plan():
    from sdm_peer.plan import Plan

    return Plan()


ConcurrentStoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_concurrent_store_state_machine = ConcurrentStoreMachine.TestCase
assert SHAPES == [S2, S4, S8] and PER_CONFIG == 2

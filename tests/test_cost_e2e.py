"""Pre-warming and shrinking end to end with the local provider (issue 9): real server, groups,
supervisors and workers; and a worker leaving its managed group on the fake Compute API."""

from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.providers.base import GroupSpec
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.run import bootstrap

from .fake_gce import FakeCompute
from sdm_peer.rundir import read_token

from .runs import all_done, free_port, init, job_command, plan_file, processes_of, shape_rows, wait_for, with_store
from .test_e2e_gce import bootstrap as gce_bootstrap, vm_attempts
from .test_e2e_local import assert_done_exactly_once, events

A, B = (1, 1), (1, 2)


def test_prewarm_boots_the_next_group_during_the_tail_and_idle_workers_leave(run, tmp_path):
    # A: one long experiment (the tail) and quick ones for a group of 3, which holds all of
    # max_vcpus; B after it, in the vCPUs A's idle workers give back as they leave.
    rows = (shape_rows(A, 1, 3, sleep=4.0) + shape_rows(A, 5, 3, sleep=0.1) + shape_rows(B, 2, 1, sleep=0.1))
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2, prewarm=True, shrink=True,
         max_vcpus=3)
    bootstrap(run)
    wait_for(lambda: all_done(run), timeout=60, what="every config DONE")
    assert_done_exactly_once(run)
    handoffs = [(e["config"], e["detail"]) for e in events(run, "handoff")]
    assert [config for config, _ in handoffs] == ["c1-m1", "c1-m2"]
    assert handoffs[1][1] == {"from": "c1-m1", "prewarm": True}
    # B's group was made, and B ran, while A's tail still ran.
    at = {(e["kind"], e["config"]): e["at"] for kind in ("group_provisioned", "config_done", "config_running")
          for e in events(run, kind)}
    assert at[("group_provisioned", "c1-m2")] < at[("config_done", "c1-m1")]
    assert at[("config_running", "c1-m2")] < at[("config_done", "c1-m1")]
    # A's idle workers left while its tail ran, keeping one in reserve.
    departed = with_store(run, lambda store: store.conn.execute(
        "SELECT d.worker, d.left_at FROM departures d JOIN configs c ON c.id = d.config WHERE c.name = 'c1-m1'"
    ).fetchall())
    assert 1 <= len(departed) <= 2 and all(left_at < at[("config_done", "c1-m1")] for _, left_at in departed)
    # Every group still ends cleanly: removed once done, no process left but the server.
    wait_for(lambda: {e["config"] for e in events(run, "group_deleted")} == {"c1-m1", "c1-m2"},
             what="both groups deleted")
    server_pid = run.server_info()["pid"]
    wait_for(lambda: [pid for pid, _ in processes_of(run.path) if pid != server_pid] == [],
             what="group processes gone")


def test_leave_group_deletes_the_workers_own_vm_and_lowers_the_target_size(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    fake = FakeCompute().start()
    try:
        api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0,
                         retry_wait=(0.01, 0.05))
        provider = GceProvider({"provider": "gce", "project": "my-proj", "zone": "us-central1-a",
                                "run_name": "study1", "server": "10.0.0.2:7787"}, "the-token", api=api)
        config = GroupSpec("c2-m4", 2, 4, 3)
        provider.create_group(config)
        group = fake.groups["sdm-study1-c2-m4"]
        leaving, *staying = fake.members("sdm-study1-c2-m4")
        provider.leave_group(config, leaving)
        assert group["targetSize"] == 2 and fake.members("sdm-study1-c2-m4") == staying
        method, path, body = fake.calls("POST", "deleteInstances$")[0]
        assert path.endswith("/zones/us-central1-a/instanceGroupManagers/sdm-study1-c2-m4/deleteInstances")
        assert body == {"instances": [f"zones/us-central1-a/instances/{leaving}"], "skipInstancesOnValidationError": True}
        provider.delete_group(config)
        provider.leave_group(config, staying[0])  # the group is gone already: fine
    finally:
        fake.stop()


def test_prewarm_and_shrink_on_the_fake_cloud(run, tmp_path, cloud):
    """Workers on fake Compute Engine VMs: the next group is created while the first one's tail
    runs, and an idle worker deletes its own VM from its managed group."""
    rows = shape_rows((2, 4), 1, 3, sleep=5.0) + shape_rows((2, 4), 4, 3, sleep=0.1) + shape_rows((1, 2), 1, 1)
    port = free_port()
    gce_bootstrap(run, cloud, plan_file(tmp_path, rows), port, tmp_path, "--set", "lease_seconds=3",
                  "--set", "prewarm=true", "--set", "shrink=true")
    client = Client(("127.0.0.1", port), read_token(run.token_file), retry_seconds=10)
    wait_for(lambda: all(c["state"] == st.CONFIG_DONE for c in client.call("status")["configs"]), timeout=120,
             what="every config DONE")
    wait_for(lambda: not cloud.groups, timeout=60, what="every group removed")
    client.close()
    first, second = "sdm-run-c2-m4", "sdm-run-c1-m2"
    created = next(index for index, (method, path, body) in enumerate(cloud.requests)
                   if method == "POST" and path.endswith("/instanceGroupManagers") and body["name"] == second)
    deleted = next(index for index, (method, path, _) in enumerate(cloud.requests)
                   if method == "DELETE" and path.endswith(f"/instanceGroupManagers/{first}"))
    assert created < deleted  # the second group was made while the first one's tail still ran
    # At least one idle worker of the first group left it, through deleteInstances on itself.
    left = [body["instances"] for method, path, body in cloud.calls("POST", f"{first}/deleteInstances$")]
    assert left and all(len(names) == 1 and names[0].startswith("zones/us-central1-a/instances/") for names in left)
    done = [a["key"] for a in vm_attempts(tmp_path) if a["outcome"] == st.DONE]
    assert sorted(done) == sorted(set(done)) and len(done) == 6

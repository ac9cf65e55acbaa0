"""`sdm-peer stop --dir RUNDIR` on a gce run, through the real google-cloud-compute client against
the fake Compute Engine REST API on 127.0.0.1, with a real file:// Litestream replica: the groups
go first, the database VM and the firewall rule only once the replica is confirmed to hold every
result (or with --force), and --dry-run changes nothing."""

import time

import pytest
from click.testing import CliRunner

from sdm_peer import replication
from sdm_peer.cli import main
from sdm_peer.client import Client
from sdm_peer.providers import gce
from sdm_peer.providers.base import GroupSpec
from sdm_peer.providers.gce import stop as gce_stop
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.run import ensure_server
from sdm_peer.rundir import read_token
from sdm_peer.store import Store

from .fake_gce import FakeCompute
from .runs import free_port, init, job_command, plan_file, shape_rows, start_server, wait_for

A, B = (2, 4), (2, 8)
PROJECT, ZONE = "my-proj", "us-central1-a"
PREFIX = f"/compute/v1/projects/{PROJECT}"
GROUPS, TEMPLATES = f"{PREFIX}/zones/{ZONE}/instanceGroupManagers", f"{PREFIX}/global/instanceTemplates"
INSTANCES, FIREWALLS = f"{PREFIX}/zones/{ZONE}/instances", f"{PREFIX}/global/firewalls"
VM, RULE = "sdm-study1-db", "sdm-study1-workers-to-db"


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    server = FakeCompute().start()
    monkeypatch.setenv("SDM_GCE_API_ENDPOINT", server.address)
    monkeypatch.setattr(gce_stop, "REPLICA_WAIT", 3.0)
    monkeypatch.setattr(gce_stop, "POLL_SECONDS", 0.2)
    yield server
    server.stop()


@pytest.fixture
def cloud_run(run, tmp_path, fake):
    """A gce run of two configs whose groups, database VM and firewall rule exist in the fake;
    its server address is a free local port nobody serves yet."""
    port = free_port()
    init(run, shape_rows(A, 2) + shape_rows(B, 1), provider="gce", project=PROJECT, zone=ZONE, run_name="study1",
         server=f"127.0.0.1:{port}", replica_url=f"file://{tmp_path}/replica")
    store = Store(run.db, create=False)
    settings = gce.gce_settings(store.settings)
    configs = store.status(now=time.time())["configs"]
    store.close()
    api = ComputeApi(PROJECT, ZONE)
    provider = gce.GceProvider(settings, "the-token", api=api)
    for config in configs:
        provider.create_group(GroupSpec.from_config(config))
    api.insert_firewall(gce.firewall_body(settings))
    api.insert_instance(gce.db_vm_body(settings, "the-token"))
    fake.requests.clear()
    run.port, run.replica = port, settings["replica_url"]
    return run


def stop(run, *options):
    return CliRunner().invoke(main, ["stop", "--dir", str(run.path), *options])


def changes(fake):
    """(method, path) of every request but operation polls and look-ups."""
    return [(method, path) for method, path, _ in fake.requests if method != "GET" and "/operations/" not in path]


def serve_replicated(run):
    """The database VM's server, here: `serve --replicate` on the run's port, replica pushed first."""
    run.write_server_info("127.0.0.1", run.port, None)
    ensure_server(run, replica_url=run.replica)


def finish_every_experiment(run):
    store = Store(run.db, create=False)
    try:
        for shape in (A, A, B):
            lease = store.claim("w1", *shape, now=time.time(), lease_seconds=60)["experiment"]["lease_token"]
            store.complete(lease, {}, 1.0, now=time.time())
    finally:
        store.close()


def assert_database_vm_kept(fake, result):
    assert result.exit_code == 1, result.output
    assert f"kept the database VM {VM} and the firewall rule {RULE}" in result.output
    assert "Try: run the same `sdm-peer stop` again" in result.output
    assert list(fake.instances) == [VM] and list(fake.firewalls) == [RULE]
    assert fake.groups == {} and fake.templates == {}  # the groups went first: that never loses a result
    assert not [path for _, path in changes(fake) if path.startswith((INSTANCES, FIREWALLS))]


def test_groups_go_first_then_once_the_replica_agrees_the_vm_then_the_firewall(cloud_run, fake):
    serve_replicated(cloud_run)
    stopped = stop(cloud_run)
    assert stopped.exit_code == 0, stopped.output
    assert changes(fake) == [
        ("DELETE", f"{GROUPS}/sdm-study1-c2-m4"), ("DELETE", f"{TEMPLATES}/sdm-study1-c2-m4"),
        ("DELETE", f"{GROUPS}/sdm-study1-c2-m8"), ("DELETE", f"{TEMPLATES}/sdm-study1-c2-m8"),
        ("DELETE", f"{INSTANCES}/{VM}"), ("DELETE", f"{FIREWALLS}/{RULE}")]
    assert fake.groups == fake.templates == fake.instances == fake.firewalls == {}
    assert "removed the group of c2-m4\nremoved the group of c2-m8\n" in stopped.output
    assert "holds every experiment's status the server reports" in stopped.output
    assert f"database VM {VM} deleted\nfirewall rule {RULE} deleted\n" in stopped.output
    assert f"sdm-peer restore --replica {cloud_run.replica} --out results.db" in stopped.output


def test_what_is_gone_already_is_fine_and_stop_can_be_repeated(cloud_run, fake):
    serve_replicated(cloud_run)
    fake.drop_group("sdm-study1-c2-m4")  # its template was left behind
    fake.groups["sdm-study1-c9-m9"] = {"name": "sdm-study1-c9-m9", "instanceTemplate": "sdm-study1-c9-m9"}  # not ours
    fake.firewalls.clear()
    first = stop(cloud_run)
    assert first.exit_code == 0, first.output
    assert "removed the group of c2-m8" in first.output and "c2-m4" not in first.output
    deleted = set(changes(fake))
    assert ("DELETE", f"{TEMPLATES}/sdm-study1-c2-m4") in deleted  # the leftover template goes too
    assert ("DELETE", f"{GROUPS}/sdm-study1-c2-m4") not in deleted  # listed first: no call for what is gone
    assert list(fake.groups) == ["sdm-study1-c9-m9"]  # only the run's own configs' groups are deleted
    assert ("DELETE", f"{FIREWALLS}/{RULE}") in deleted  # a 404
    assert f"firewall rule {RULE} was already gone" in first.output
    fake.groups.clear()
    again = stop(cloud_run)  # every DELETE is a 404 now, and nothing is left to confirm
    assert again.exit_code == 0, again.output
    assert f"the database VM {VM} is already gone: nothing to confirm" in again.output
    assert f"database VM {VM} was already gone" in again.output
    assert fake.groups == fake.templates == fake.instances == fake.firewalls == {}


def test_a_replica_behind_the_server_keeps_the_database_vm(cloud_run, fake, tmp_path):
    replication.push(cloud_run.db, cloud_run.replica)
    init(cloud_run, shape_rows(A, 4))  # two more experiments the replica never gets
    start_server(cloud_run, port=cloud_run.port)  # no Litestream: it stays behind
    refused = stop(cloud_run)
    assert_database_vm_kept(fake, refused)
    assert "(after 3s, it differs from the server: c2-m4 not_started: 4 on the server, 2 in the replica)" \
        in refused.output


def test_a_missing_replica_keeps_the_database_vm(cloud_run, fake):
    start_server(cloud_run, port=cloud_run.port)
    refused = stop(cloud_run)
    assert_database_vm_kept(fake, refused)
    assert f"(after 3s, {cloud_run.replica}: no backup there (a missing or empty replica))" in refused.output


def test_force_deletes_the_database_vm_without_confirming(cloud_run, fake):
    start_server(cloud_run, port=cloud_run.port)  # and no replica at all
    forced = stop(cloud_run, "--force")
    assert forced.exit_code == 0, forced.output
    assert "--force: not confirming" in forced.output
    assert fake.groups == fake.templates == fake.instances == fake.firewalls == {}


def test_without_the_server_a_replica_that_shows_the_study_finished_is_enough(cloud_run, fake):
    finish_every_experiment(cloud_run)
    replication.push(cloud_run.db, cloud_run.replica)
    stopped = stop(cloud_run)  # nobody serves the run's port: as from outside the VM's network
    assert stopped.exit_code == 0, stopped.output
    assert f"{cloud_run.replica} shows all 3 experiments finished" in stopped.output
    assert fake.instances == fake.firewalls == {}


def test_without_the_server_an_unfinished_replica_keeps_the_database_vm(cloud_run, fake):
    replication.push(cloud_run.db, cloud_run.replica)
    refused = stop(cloud_run)
    assert_database_vm_kept(fake, refused)
    assert "cannot be reached from here, and the replica shows 3 of 3 experiments unfinished" in refused.output


def test_a_run_without_a_replica_keeps_its_database_vm(cloud_run, fake):
    init(cloud_run, shape_rows(A, 2), replica_url=None)
    start_server(cloud_run, port=cloud_run.port)
    refused = stop(cloud_run)
    assert_database_vm_kept(fake, refused)
    assert "(the run has no replica_url setting: its results are only on the database VM)" in refused.output


def test_dry_run_prints_every_call_and_changes_nothing(cloud_run, fake):
    before = (dict(fake.groups), dict(fake.templates), dict(fake.instances), dict(fake.firewalls))
    shown = stop(cloud_run, "--dry-run")
    assert shown.exit_code == 0, shown.output
    calls = [line for line in shown.output.splitlines() if line.startswith(("DELETE ", "GET "))]
    listed = 'filter=name eq "sdm-study1-.*"'  # a plain RE2: `-` needs no escaping
    assert calls == [
        f"GET {GROUPS}?{listed}", f"GET {TEMPLATES}?{listed}",  # what a real stop asks first
        f"DELETE {GROUPS}/sdm-study1-c2-m4", f"DELETE {TEMPLATES}/sdm-study1-c2-m4",
        f"DELETE {GROUPS}/sdm-study1-c2-m8", f"DELETE {TEMPLATES}/sdm-study1-c2-m8",
        f"DELETE {INSTANCES}/{VM}", f"DELETE {FIREWALLS}/{RULE}"]
    assert f"would confirm that {cloud_run.replica} holds every result" in shown.output
    assert fake.requests == []
    assert (fake.groups, fake.templates, fake.instances, fake.firewalls) == before


def test_force_and_dry_run_are_for_a_gce_run(run):
    init(run, shape_rows(A, 1))
    refused = stop(run, "--dry-run")
    assert refused.exit_code == 2 and "--force and --dry-run are for a gce run" in refused.output


def test_a_study_on_the_fake_cloud_stopped_half_way_leaves_nothing_and_its_results_in_the_replica(
        run, tmp_path, cloud):
    replica, port = f"file://{tmp_path}/replica", free_port()
    rows = shape_rows(A, 2, 2, sleep=0.1) + shape_rows(A, 2, 2, sleep=60, slow=True) + shape_rows(B, 1, 1)
    started = CliRunner().invoke(main, [
        "bootstrap", "--plan", str(plan_file(tmp_path, rows)), "--provider", "gce", "--dir", str(run.path),
        "--project", PROJECT, "--zone", ZONE, "--set", f"replica_url={replica}", "--set", f"server=127.0.0.1:{port}",
        "--set", "max_vcpus=4",  # c2-m4's group of 2; c2-m8 waits (the fake's quotas would hold both)
        "--", *job_command(tmp_path)])
    assert started.exit_code == 0, started.output
    client = Client(("127.0.0.1", port), read_token(run.token_file), retry_seconds=10)
    half_way = {"done": 2, "started": 2}
    wait_for(lambda: {key: client.call("status")["totals"][key] for key in half_way} == half_way, timeout=90,
             what="two experiments done and two running")
    client.close()

    cloud.requests.clear()
    stopped = stop(run)
    assert stopped.exit_code == 0, stopped.output
    # c2-m8 never had a group (its config was still waiting): listed first, it costs no call.
    assert [path.rsplit("/", 1)[1] for _, path in changes(cloud)] == [
        "sdm-run-c2-m4", "sdm-run-c2-m4", "sdm-run-db", "sdm-run-workers-to-db"]
    assert cloud.groups == cloud.templates == cloud.instances == cloud.firewalls == {}
    wait_for(lambda: not cloud.vms.alive(), timeout=30, what="every VM stopped")
    replication.restore(replica, tmp_path / "results.db")
    store = Store(tmp_path / "results.db", readonly=True)
    try:
        totals = store.status(now=time.time())["totals"]
    finally:
        store.close()
    assert (totals["total"], totals["done"]) == (5, 2)

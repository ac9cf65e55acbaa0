"""A whole study on "Compute Engine": `sdm-peer bootstrap --provider gce` against the fake REST
API, whose VMs boot as local processes from the rendered cloud-configs: the database VM runs
`serve --replicate` (real Litestream, a file:// replica), the workers `work --from-metadata`.
Hand-offs go through the gce provider inside the workers, as in the cloud."""

import json

from click.testing import CliRunner

from sdm_peer import states as st
from sdm_peer.cli import main
from sdm_peer.client import Client
from sdm_peer.providers.gce import package
from sdm_peer.rundir import read_token
from sdm_peer.store import Store

from .runs import free_port, job_command, plan_file, sdm, shape_rows, wait_for

A, B, C = (2, 4), (1, 2), (2, 8)
PROJECT, ZONE = "my-proj", "us-central1-a"


def bootstrap(run, cloud, plan, port, tmp_path, *extra):
    return sdm("bootstrap", "--plan", plan, "--provider", "gce", "--dir", run.path, "--project", PROJECT,
               "--zone", ZONE, "--set", f"replica_url=file://{tmp_path}/replica", "--set", f"server=127.0.0.1:{port}",
               *extra, "--", *job_command(tmp_path), env=cloud.env, timeout=120)


def test_study_runs_on_the_fake_cloud_with_hand_offs_and_a_preemption(run, tmp_path, cloud):
    rows = shape_rows(A, 4, 2, sleep=0.2, first_attempt_sleep=2) + shape_rows(B, 2, 1, sleep=0.2) \
        + shape_rows(C, 1, 1, sleep=0.2)
    plan = plan_file(tmp_path, rows)
    port = free_port()
    # max_vcpus 2 (unset: what the fake's quotas leave free, all three groups at once): one
    # group after another, so each next provisioner sweeps the template the last one left.
    started = bootstrap(run, cloud, plan, port, tmp_path, "--set", "lease_seconds=3", "--set", "max_vcpus=2")
    assert "watch it with: sdm-peer status --replica file://" in started.stdout
    # The VMs install the sdm-peer that bootstrapped the run, put beside the replica.
    assert (tmp_path / "replica" / package.wheel_name()).is_file()
    client = Client(("127.0.0.1", port), read_token(run.token_file), retry_seconds=10)
    status = lambda: client.call("status")  # noqa: E731 - the live database is the VM's

    # A spot preemption of a worker of the first group while its experiment runs: SIGTERM and
    # the shutdown-script; the managed group then boots it again.
    running = wait_for(lambda: [a for a in vm_attempts(tmp_path) if a["outcome"] is None], what="a running attempt")
    victim = running[0]["worker"]
    cloud.vms.preempt(victim)

    wait_for(lambda: all(c["state"] == st.CONFIG_DONE for c in status()["configs"]), timeout=120,
             what="every config DONE")
    wait_for(lambda: not cloud.groups, timeout=60, what="every group removed")
    # A worker deleting its own group is deleted with it before it can delete the template: the
    # next provisioner, or the next worker deleting its own group, sweeps those of finished
    # configs; after the last, `stop` does.
    assert set(cloud.templates) <= {"sdm-run-c1-m2", "sdm-run-c2-m8"}
    totals = status()["totals"]
    assert totals["done"] == 7 and totals["total"] == 7

    # The database VM and the firewall rule stay (the study's results live there).
    assert list(cloud.instances) == ["sdm-run-db"] and list(cloud.firewalls) == ["sdm-run-workers-to-db"]
    rule = cloud.firewalls["sdm-run-workers-to-db"]
    assert rule["sourceTags"] == ["sdm-run-worker"] and rule["allowed"] == [{"IPProtocol": "tcp",
                                                                               "ports": [str(port)]}]
    # Every group was made by the run: the first by bootstrap, the next two by hand-offs inside
    # workers; each deleted group first, then its template.
    created = [body["name"] for _, _, body in cloud.calls("POST", "instanceGroupManagers$")]
    assert created == ["sdm-run-c2-m4", "sdm-run-c1-m2", "sdm-run-c2-m8"]
    deletions = [path.rsplit("/", 2)[-2:] for method, path, _ in cloud.requests if method == "DELETE"]
    for name in created:
        if ["instanceTemplates", name] in deletions:
            assert deletions.index(["instanceGroupManagers", name]) < deletions.index(["instanceTemplates", name])
    # The preempted VM's experiment was given back and run again; nothing ran twice to the end.
    assert cloud.vms.started.count(victim) == 2
    attempts = vm_attempts(tmp_path)
    assert (running[0]["key"], victim, st.INTERRUPTED) in {(a["key"], a["worker"], a["outcome"]) for a in attempts}
    done = [a["key"] for a in attempts if a["outcome"] == st.DONE]
    assert sorted(done) == sorted(set(done)) and len(done) == 7
    client.close()


def vm_attempts(tmp_path):
    """Every attempt, read from the database VM's own database file."""
    store = Store(tmp_path / "vms" / "sdm-run-db" / "var" / "lib" / "sdm-peer" / "sdm.db", create=False)
    try:
        return store.attempts()
    finally:
        store.close()


def test_bootstrap_again_resumes_without_pushing_or_duplicating(run, tmp_path, cloud):
    plan = plan_file(tmp_path, shape_rows(A, 2, 1, sleep=30))
    arguments = ["bootstrap", "--plan", str(plan), "--provider", "gce", "--dir", str(run.path), "--project", PROJECT,
                 "--zone", ZONE, "--set", f"replica_url=file://{tmp_path}/replica", "--set",
                 f"server=127.0.0.1:{free_port()}", "--", *job_command(tmp_path)]
    first = CliRunner().invoke(main, arguments)  # in this process: the client library is imported once
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 0, again.output
    assert "already holds this run's database: not pushed" in again.output
    assert "database VM sdm-run-db exists" in again.output
    assert len(cloud.calls("POST", "instances$")) == 2 and len(cloud.instances) == 2  # the database VM, a worker
    assert len(cloud.vms.started) == 2  # the database VM and one worker: nothing booted twice
    assert len(cloud.groups) == 1


def test_a_shape_compute_engine_cannot_serve_is_refused_before_anything_is_written(run, tmp_path, cloud):
    plan = plan_file(tmp_path, shape_rows(A, 1) + shape_rows((1, 0.5), 1))
    refused = sdm(
        "bootstrap", "--plan", plan, "--provider", "gce", "--dir", run.path, "--project", PROJECT, "--zone", ZONE,
        "--bucket", "my-bucket", "--", "true", env=cloud.env, check=False)
    assert refused.returncode == 2
    assert "1 vCPU x 0.5 GB: n2 takes" in refused.stderr and len(refused.stderr.splitlines()) == 2
    assert not run.db.exists() and cloud.requests == []


def test_dry_run_prints_every_call_and_changes_nothing(run, tmp_path, cloud):
    plan = plan_file(tmp_path, shape_rows(A, 2, 3))
    shown = sdm("bootstrap", "--plan", plan, "--provider", "gce", "--dir", run.path, "--project", PROJECT,
                "--zone", ZONE, "--bucket", "my-bucket", "--dry-run", "--", "true", env=cloud.env)
    calls = [line.split(" ", 2) for line in shown.stdout.splitlines() if line.startswith(("POST ", "DELETE "))]
    prefix = f"/compute/v1/projects/{PROJECT}"
    assert [call[:2] for call in calls] == [
        ["POST", f"{prefix}/global/firewalls"], ["POST", f"{prefix}/zones/{ZONE}/instances"],
        ["POST", f"{prefix}/global/instanceTemplates"], ["POST", f"{prefix}/zones/{ZONE}/instanceGroupManagers"]]
    assert json.loads(calls[3][2])["targetSize"] == 3
    assert "gs://my-bucket/run" in shown.stdout
    # It reads the quotas (reading changes nothing) and says what it read.
    assert "quota CPUS in region us-central1: 0 of 10000 in use" in shown.stdout
    assert {method for method, _, _ in cloud.requests} == {"GET"}
    assert not run.db.exists() and list(run.path.iterdir()) == []


def test_group_up_and_down_use_the_runs_stored_settings(run, tmp_path, cloud):
    cloud.vms = None  # no VMs boot: this is about the API calls only
    plan = plan_file(tmp_path, shape_rows(A, 1) + shape_rows(C, 1))
    sdm("init", run.db, "--plan", plan, "--set", "provider=gce", "--set", f"project={PROJECT}", "--set",
        f"zone={ZONE}", "--set", "run_name=ops", "--set", "spot=false")
    cli = CliRunner()  # in this process: the client library is imported once
    up = cli.invoke(main, ["group", "up", "c2-m8", "--db", str(run.db)])
    assert up.exit_code == 0 and "group of c2-m8 is up (1 workers)" in up.output
    assert cloud.templates["sdm-ops-c2-m8"]["properties"]["scheduling"]["provisioningModel"] == "STANDARD"
    assert cloud.groups["sdm-ops-c2-m8"]["targetSize"] == 1
    for command in (["up", "c2-m8", "--dir", str(run.path)], ["down", "c2-m8", "--db", str(run.db)],
                    ["down", "c2-m8", "--db", str(run.db)]):
        assert cli.invoke(main, ["group", *command]).exit_code == 0
    assert cloud.groups == {} and cloud.templates == {}
    changes = [method for method, path, _ in cloud.requests
               if "/operations/" not in path and method in ("POST", "DELETE") and not path.endswith("Instances")]
    assert changes == ["POST", "POST", "POST", "POST", "DELETE", "DELETE", "DELETE", "DELETE"]  # 409s, 404s: success
    missing = cli.invoke(main, ["group", "up", "c9-m9", "--db", str(run.db)])
    assert missing.exit_code == 2 and "no config 'c9-m9'" in missing.output

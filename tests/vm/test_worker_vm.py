"""A worker VM boots from the worker cloud-config alone, under QEMU with real cloud-init, systemd
and Debian's google-guest-agent, and works for a server on the host; an ACPI shutdown mid-
experiment (what a spot preemption is) runs the real shutdown-script, which gives the lease back."""

import time

import pytest

from sdm_peer import states as st
from sdm_peer.providers.gce import cloudinit, metadata as md
from sdm_peer.rundir import RunDir, read_token

from ..runs import free_port, init, start_server, with_store
from . import host
from .conftest import FIGURES, wait_for

RUN, CONFIG, VM = "vm", "c1-m1", "sdm-vm-c1-m1-k3q9"
SHORT, LONG = 3, 3600  # seconds an experiment sleeps: the last one is interrupted, never finished
# The experiment, run by the guest's own python3: sleep as its params say, then name the host.
JOB = ("import json, os, socket, time; time.sleep(json.loads(os.environ['SDM_PARAMS'])['sleep']); "
       "open(os.environ['SDM_RESULT_FILE'], 'w').write(json.dumps({'host': socket.gethostname()}))")
BOOT_SECONDS = 900  # TCG on a shared core: boot, apt, venv and pip take minutes
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `sdm-peer serve` on the host for one config of shape 1 vCPU x 1 GB; the lease is
    long, so only a release can interrupt an experiment within the test's time."""
    run = RunDir(tmp_path_factory.mktemp("worker-run") / "run")
    rows = [{"cores": 1, "memory_gb": 1, "i": i, "sleep": SHORT if i < 3 else LONG} for i in range(4)]
    init(run, rows, provider="gce", project=host.PROJECT, zone=host.ZONE, run_name=RUN,
         command=["python3", "-c", JOB], lease_seconds=900)
    port = free_port()
    process = start_server(run, port=port)
    yield run, port
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def worker(server, boot, box):
    """The worker VM: metadata exactly as the gce provider's instance template puts it, except the
    server address, which is the host's server as the guest reaches it."""
    run, port = server
    items = {"user-data": cloudinit.render_worker({"run_name": RUN, "sdm_peer_spec": "sdm-peer[gce]==0.1.0",
                                                   "code_url": ""}),
             "shutdown-script": cloudinit.shutdown_script(), md.SERVER_KEY: host.GUEST_SERVER,
             md.TOKEN_KEY: read_token(run.token_file), md.RUN_KEY: RUN, md.CONFIG_KEY: CONFIG, md.CORES_KEY: "1",
             md.MEMORY_KEY: "1"}
    return boot(VM, items, forwards={host.GUEST_SERVER: port})


def attempts(run):
    return with_store(run, lambda store: store.attempts())


def test_a_worker_vm_boots_from_its_cloud_config_and_finishes_experiments(server, worker):
    run, _ = server
    first = wait_for(lambda: attempts(run), BOOT_SECONDS, "claim from the worker VM", worker)
    FIGURES[f"boot to first claim, {VM}"] = f"{time.monotonic() - worker.started_at:.0f} s"
    # Its name and shape came from the metadata server: the worker id is the VM's name.
    assert {a["worker"] for a in first} == {VM}
    done = wait_for(lambda: [a for a in attempts(run) if a["outcome"] == st.DONE] if len(
        [a for a in attempts(run) if a["outcome"] == st.DONE]) == 3 else None, 300, "3 experiments done", worker)
    assert {a["worker"] for a in done} == {VM}
    wait_for(lambda: [a for a in attempts(run) if a["outcome"] is None], 120, "the long experiment running", worker)
    # The guest's own view: cloud-init finished without errors, no unit failed.
    report = wait_for(lambda: (r := worker.report()) and "status: done" in r["cloud_init"] and r, 300,
                      "report of cloud-init done", worker)
    assert report["failed"] == [], worker.diagnostics()
    assert "errors: []" in report["cloud_init"] or "error" not in report["cloud_init"], worker.diagnostics()
    assert report["system"] == "running", worker.diagnostics()


def test_an_acpi_shutdown_runs_the_shutdown_script_and_interrupts_at_once(server, worker):
    run, _ = server
    running = [a for a in attempts(run) if a["outcome"] is None]
    assert len(running) == 1, running
    asked_before = len(worker.metadata.requests)
    worker.powerdown()
    stopped_at = time.monotonic()
    ended = wait_for(lambda: [a for a in attempts(run) if a["key"] == running[0]["key"] and a["outcome"]], 120,
                     "end of the running attempt")
    assert ended[0]["outcome"] == st.INTERRUPTED
    assert time.monotonic() - stopped_at < 120  # the lease (900 s) did not lapse: it was given back
    # The real shutdown-script ran: the guest agent's script runner read it, and `sdm-peer release
    # --from-metadata` read the token from the metadata server as the VM went down.
    after = worker.metadata.requests[asked_before:]
    assert any("shutdown-script" in path for path in after), after
    assert any(md.TOKEN_KEY in path for path in after), after
    assert worker.wait_stopped(180) is not None, "the VM did not power off"

"""A worker VM boots from the worker cloud-config alone, under QEMU with real cloud-init, systemd
and Debian's google-guest-agent, and works for a server on the host; an ACPI shutdown mid-
experiment (what a spot preemption is) runs the real shutdown-script, which gives the lease back."""

import time

import pytest

from sdm_peer import states as st
from sdm_peer.providers.gce import metadata as md

from ..runs import with_store
from .conftest import FIGURES, VM, wait_for

BOOT_SECONDS = 1500  # TCG on a core shared with other work: boot, apt, venv and pip take many minutes
pytestmark = pytest.mark.timeout(1800)


def attempts(run):
    return with_store(run, lambda store: store.attempts())


def test_a_worker_vm_boots_from_its_cloud_config_and_finishes_experiments(worker_server, worker):
    run, _ = worker_server
    first = wait_for(lambda: attempts(run), BOOT_SECONDS, "claim from the worker VM", worker)
    FIGURES[f"boot to first claim, {VM}"] = f"{min(a['claimed_at'] for a in first) - worker.started_wall:.0f} s"
    # Its name and shape came from the metadata server: the worker id is the VM's name.
    assert {a["worker"] for a in first} == {VM}
    done = wait_for(lambda: len(finished := [a for a in attempts(run) if a["outcome"] == st.DONE]) == 3 and finished,
                    300, "3 experiments done", worker)
    assert {a["worker"] for a in done} == {VM}
    wait_for(lambda: [a for a in attempts(run) if a["outcome"] is None], 120, "the long experiment running", worker)
    # The guest's own view once booted: cloud-init done without errors, no unit failed.
    report = wait_for(lambda: (r := worker.report()) and r["system"] != "starting" and r, 300, "booted report",
                      worker)
    assert report["failed"] == [] and report["system"] == "running"
    assert "status: done" in report["cloud_init"] and "error" not in report["cloud_init"]


def test_an_acpi_shutdown_runs_the_shutdown_script_and_interrupts_at_once(worker_server, worker):
    run, _ = worker_server
    running = [a for a in attempts(run) if a["outcome"] is None]
    assert len(running) == 1, running
    asked_before = len(worker.metadata.requests)
    worker.powerdown()
    stopped_at = time.monotonic()
    ended = wait_for(lambda: [a for a in attempts(run) if a["key"] == running[0]["key"] and a["outcome"]], 300,
                     "end of the running attempt")
    assert ended[0]["outcome"] == st.INTERRUPTED, ended
    assert time.monotonic() - stopped_at < 300  # the lease (900 s) did not lapse: it was given back
    assert worker.wait_stopped(300) is not None, "the VM did not power off"
    # The real shutdown-script ran: the guest agent's script runner read the attributes (it takes
    # `shutdown-script` from their recursive JSON), then `sdm-peer release --from-metadata` read
    # the server and token from the metadata server as the VM went down.
    after = worker.metadata.requests[asked_before:]
    runner = [i for i, path in enumerate(after) if path.startswith("/computeMetadata/v1/instance/attributes/?")]
    assert runner and any(md.TOKEN_KEY in path for path in after[runner[0]:]), (after, ended)

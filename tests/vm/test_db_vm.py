"""The database VM boots from the database cloud-config alone: it restores the run from its replica
(a file:// replica on a disk that stands in for the bucket), serves it under `litestream
replicate -exec`, answers a worker on the host, and ships the changes back to the replica."""

import os
import subprocess
import sys
import time

import pytest

from sdm_peer import replication
from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.rundir import read_token
from sdm_peer.store import Store

from .conftest import DB_JOB, FIGURES, wait_for

pytestmark = pytest.mark.timeout(1800)


def test_a_database_vm_restores_its_replica_and_serves_a_worker(database, box, tmp_path):
    run, disk, port, vm = database
    token = read_token(run.token_file)
    client = Client(("127.0.0.1", port), token, retry_seconds=2)

    def answers():
        try:
            return client.call("status")
        except Exception:
            return None
    status = wait_for(answers, 1500, "answer from the database VM's server", vm, interval=5)
    FIGURES[f"boot to serving, {vm.name}"] = f"{time.monotonic() - vm.started_at:.0f} s"
    assert status["totals"]["total"] == 3  # the restored run, not a fresh database
    worker = subprocess.run(
        [sys.executable, "-m", "sdm_peer", "work", "--server", f"127.0.0.1:{port}", "--token-file",
         str(run.token_file), "--cores", "1", "--memory-gb", "1", "--worker-id", "host-worker",
         "--work-dir", str(tmp_path / "work"), "--", sys.executable, "-c", DB_JOB],
        capture_output=True, text=True, timeout=600, env={**os.environ, **box["compute_env"]})
    assert worker.returncode == 0, worker.stderr
    assert client.call("status")["totals"]["done"] == 3
    client.close()
    report = wait_for(lambda: (r := vm.report()) and r["system"] != "starting" and r, 300, "booted report", vm)
    assert report["failed"] == [] and report["system"] == "running" and "status: done" in report["cloud_init"]
    # Litestream runs the server (`replicate -exec`), and ships what the worker did to the replica.
    assert "litestream" in report["processes"]
    vm.powerdown()
    assert vm.wait_stopped(180) is not None, "the database VM did not power off"
    subprocess.run(["debugfs", "-R", f"rdump /replica {tmp_path}", str(disk)], check=True, capture_output=True)
    restored = tmp_path / "restored.db"
    replication.restore(f"file://{tmp_path / 'replica'}", restored)
    with Store(restored, create=False) as store:
        assert [e["status"] for e in store.experiments()] == [st.DONE] * 3

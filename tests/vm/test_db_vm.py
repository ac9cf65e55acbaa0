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
from sdm_peer.providers.gce import cloudinit
from sdm_peer.rundir import RunDir, read_token
from sdm_peer.store import Store

from ..runs import free_port, init
from . import host, image
from .conftest import FIGURES, wait_for

RUN, VM = "vm", "sdm-vm-db"
GUEST_PORT = 7787
pytestmark = pytest.mark.timeout(1800)
JOB = ["python3", "-c", "import os; open(os.environ['SDM_RESULT_FILE'], 'w').write('{}')"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The run's database, pushed to a replica as bootstrap does, on a disk image for the VM."""
    where = tmp_path_factory.mktemp("db-run")
    run = RunDir(where / "run")
    init(run, [{"cores": 1, "memory_gb": 1, "i": i} for i in range(3)], provider="gce", project=host.PROJECT,
         zone=host.ZONE, run_name=RUN, command=JOB)
    (where / "bucket").mkdir()
    replication.push(run.db, f"file://{where / 'bucket' / 'replica'}")
    disk = where / "bucket.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(where / "bucket"), str(disk), "256M"], check=True)
    return run, disk


def test_a_database_vm_restores_its_replica_and_serves_a_worker(bucket, boot, box, tmp_path):
    run, disk = bucket
    token = read_token(run.token_file)
    settings = {"run_name": RUN, "replica_url": f"file://{image.BUCKET_MOUNT}/replica",
                "sdm_peer_spec": "sdm-peer[gce]==0.1.0"}
    port = free_port()
    vm = boot(VM, {"user-data": cloudinit.render_db(settings, token, GUEST_PORT)}, host_forwards=[(port, GUEST_PORT)],
              disks=[disk])
    client = Client(("127.0.0.1", port), token, retry_seconds=2)

    def answers():
        try:
            return client.call("status")
        except Exception:
            return None
    status = wait_for(answers, 900, "answer from the database VM's server", vm, interval=5)
    FIGURES[f"boot to serving, {VM}"] = f"{time.monotonic() - vm.started_at:.0f} s"
    assert status["totals"]["total"] == 3  # the restored run, not a fresh database
    worker = subprocess.run(
        [sys.executable, "-m", "sdm_peer", "work", "--server", f"127.0.0.1:{port}", "--token-file",
         str(run.token_file), "--cores", "1", "--memory-gb", "1", "--worker-id", "host-worker",
         "--work-dir", str(tmp_path / "work"), "--", sys.executable, "-c", JOB[2]],
        capture_output=True, text=True, timeout=600, env={**os.environ, **box["compute_env"]})
    assert worker.returncode == 0, worker.stderr + vm.diagnostics()
    totals = client.call("status")["totals"]
    assert totals["done"] == 3, totals
    # It serves under Litestream: the server is `litestream replicate -exec` 's child.
    report = wait_for(lambda: (r := vm.report()) and "status: done" in r["cloud_init"] and r, 300,
                      "report of cloud-init done", vm)
    assert report["failed"] == [] and report["system"] == "running", vm.diagnostics()
    client.close()
    vm.powerdown()
    assert vm.wait_stopped(180) is not None, "the database VM did not power off"
    # What the VM replicated back: a replica that restores to the finished run.
    subprocess.run(["debugfs", "-R", f"rdump /replica {tmp_path}", str(disk)], check=True, capture_output=True)
    restored = tmp_path / "restored.db"
    replication.restore(f"file://{tmp_path / 'replica'}", restored)
    with Store(restored, create=False) as store:
        assert [e["state"] for e in store.experiments()] == [st.DONE] * 3

import json
import sys
from pathlib import Path

import pytest

from sdm_peer.plan import read_plan
from sdm_peer.store import Store

from .runs import ServerProcess

T0 = 1_700_000_000.0
LEASE = 60.0


def write_plan(path, rows):
    Path(path).write_text(json.dumps(rows))
    return path


def grid(shapes, per_config, **extra):
    """Plan rows: `per_config` experiments for each (cores, memory_gb) shape."""
    return [{"cores": cores, "memory_gb": memory, "i": i, **extra}
            for cores, memory in shapes for i in range(per_config)]


def claim(store, worker="w1", shape=(2, 4), at=T0):
    """A store-level claim at `at` with the tests' lease period."""
    return store.claim(worker, *shape, now=at, lease_seconds=LEASE)


@pytest.fixture
def make_store(tmp_path):
    """A real SQLite store built from plan rows, with settings."""
    opened = []

    def make(rows, name="run.db", **settings):
        plan = read_plan(write_plan(tmp_path / (name + ".plan.json"), rows))
        store = Store(tmp_path / name)
        store.import_plan(plan, settings=settings, now=T0)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """Run CLI commands in a scratch directory with no token in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDM_TOKEN", raising=False)
    return tmp_path


PYTHON = sys.executable


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    """The fake Compute Engine (tests/fake_gce.py) with its metadata server and VMs that boot as
    local processes; this process and `cloud.env` talk to it. All stopped at the end."""
    from .fake_gce import FakeCompute, FakeMetadata, LocalVms

    monkeypatch.setenv("NO_GCE_CHECK", "true")
    metadata = FakeMetadata().start()
    vms = LocalVms(tmp_path / "vms", metadata)
    compute = FakeCompute(vms).start()
    vms.api = compute.address  # each VM's calls name it (a VM deleting itself dies mid-call)
    compute.env = {"SDM_GCE_API_ENDPOINT": compute.address, "NO_GCE_CHECK": "true"}
    monkeypatch.setenv("SDM_GCE_API_ENDPOINT", compute.address)
    yield compute
    vms.stop_all()
    compute.stop()
    metadata.stop()


@pytest.fixture
def run(tmp_path):
    """A run directory whose processes are all gone when the test ends (else the test fails)."""
    from sdm_peer.providers.base import GroupSpec
    from sdm_peer.providers.local import LocalProvider
    from sdm_peer.run import stop_server
    from sdm_peer.rundir import RunDir

    from .runs import kill_all, processes_of

    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    yield run_dir
    groups = LocalProvider(run_dir)  # this machine's processes only, whatever the run's provider
    for record in groups.groups():
        groups.delete_group(GroupSpec(record["config"]))
    stop_server(run_dir)
    leftovers = processes_of(tmp_path)
    kill_all(tmp_path)
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def spawn_server(tmp_path):
    """spawn_server(db, *options, port=0, lease_seconds=2, run_dir=None) -> ServerProcess
    (lease_seconds=None: no --lease-seconds, the run's setting)."""
    started = []

    def start(db=None, *options, port=0, lease_seconds=2, run_dir=None):
        target = ["--dir", str(run_dir)] if run_dir is not None else ["--db", str(db)]
        lease = [] if lease_seconds is None else ["--lease-seconds", str(lease_seconds)]
        argv = [sys.executable, "-m", "sdm_peer", "serve", *target, "--port", str(port), *lease, *options]
        server = ServerProcess(argv, tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server

    yield start
    codes = [server.stop() for server in started]
    assert codes == [0] * len(started), f"server exit codes {codes}"

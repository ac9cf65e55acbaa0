"""`make vm-test`'s fixtures: the guest image, the host's fakes, and booting VMs under QEMU.
Where QEMU cannot run, every test fails with the reason: nothing here skips."""

import shutil
import subprocess
import time

import pytest

from sdm_peer import replication
from sdm_peer.providers.base import provider_for
from sdm_peer.providers.gce import cloudinit, package
from sdm_peer.providers.gce import metadata as md
from sdm_peer.run import provision_groups, server_client, stored_settings
from sdm_peer.rundir import RunDir, read_token

from ..runs import free_port, init, start_server
from ..fake_gce import FakeCompute
from . import host, image

FIGURES = {}  # what the closing summary prints: image build time, boot-to-first-claim per VM
BOOTED = []  # every VM of the session, for a failing test's report


@pytest.fixture(scope="session")
def box(tmp_path_factory):
    """The image (built or cached), the wheelhouse, the accelerator, and the shared services fake."""
    missing = [tool for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"vm-test needs {', '.join(missing)} (make vm-test installs them as root with apt-get)")
    image_dir, seconds = image.image()
    FIGURES["image"] = f"built in {seconds:.0f} s" if seconds else "cached"
    ours, deps = host.wheelhouse(image.CACHE)
    accel = "kvm" if host.kvm_works(image_dir, image.CACHE) else "tcg"
    FIGURES["accelerator"] = accel
    buckets = tmp_path_factory.mktemp("buckets")
    services = host.Services([ours, deps], buckets).start()
    compute = FakeCompute().start()  # what a worker's hand-off talks to, from the guest or the host
    yield {"image": image_dir, "accel": accel, "services": services, "buckets": buckets, "compute": compute,
           "compute_env": {"SDM_GCE_API_ENDPOINT": compute.address, "NO_GCE_CHECK": "true"},
           "work": tmp_path_factory.mktemp("vms")}
    compute.stop()
    services.stop()


@pytest.fixture(scope="session")
def boot(box):
    """boot(name, metadata items, **Vm options) -> a running Vm; all killed at the session's end.
    A failing test's report carries every VM's diagnostics (see pytest_runtest_makereport)."""

    def start(name, items, forwards=None, **options):
        forwards = {host.GUEST_COMPUTE: box["compute"].httpd.server_address[1], **(forwards or {})}
        vm = host.Vm(name, items, image_dir=box["image"], services=box["services"], work_dir=box["work"],
                     accel=box["accel"], forwards=forwards, **options).start()
        BOOTED.append(vm)
        return vm

    yield start
    for vm in BOOTED:
        vm.kill()


RUN, CONFIG, VM = "vm", "c1-m1", "sdm-vm-c1-m1-k3q9"
SHORT, LONG = 3, 3600  # seconds an experiment sleeps: the last one is interrupted, never finished
# The experiment, run by the guest's own python3: sleep as its params say, then name the host.
JOB = ("import json, os, socket, time; time.sleep(json.loads(os.environ['SDM_PARAMS'])['sleep']); "
       "open(os.environ['SDM_RESULT_FILE'], 'w').write(json.dumps({'host': socket.gethostname()}))")
DB_JOB = "import os; open(os.environ['SDM_RESULT_FILE'], 'w').write('{}')"


@pytest.fixture(scope="session", autouse=True)
def fleet(database, study):
    """The database VM and the study's first VM start booting before the first test, one a core:
    a boot under TCG takes minutes. The worker VM boots with the study's test (it asks for it),
    beside the study's second VM: two at a time, each has a core, and the longest chain (the
    study's two boots one after the other) runs at full speed."""


@pytest.fixture(scope="session")
def database(boot, tmp_path_factory):
    """The database VM, booted from db.yaml with the run's database pushed to its replica as
    bootstrap does, on a disk (the bucket) the VM mounts; its server reached through a host port.
    Session-wide (see `fleet`)."""
    where = tmp_path_factory.mktemp("db-run")
    run = RunDir(where / "run")
    init(run, [{"cores": 1, "memory_gb": 1, "i": i} for i in range(3)], provider="gce", project=host.PROJECT,
         zone=host.ZONE, run_name="vmdb", command=["python3", "-c", DB_JOB])
    (where / "bucket").mkdir()
    replication.push(run.db, f"file://{where / 'bucket' / 'replica'}")
    disk = where / "bucket.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(where / "bucket"), str(disk), "256M"], check=True)
    settings = {"run_name": "vmdb", "replica_url": f"file://{image.BUCKET_MOUNT}/replica",
                "sdm_peer_spec": "sdm-peer[gce]==0.1.0"}
    port = free_port()
    vm = boot("sdm-vmdb-db", {"user-data": cloudinit.render_db(settings, read_token(run.token_file),
                                                               host.SERVER_PORT)},
              host_forwards=[(port, host.SERVER_PORT)], disks=[disk])
    return run, disk, port, vm


@pytest.fixture(scope="session")
def worker_server(tmp_path_factory):
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


@pytest.fixture(scope="session")
def worker(worker_server, boot):
    """The worker VM: metadata exactly as the gce provider's instance template puts it, except the
    server address, which is the host's server as the guest reaches it."""
    run, port = worker_server
    items = {"user-data": cloudinit.render_worker({"run_name": RUN, "sdm_peer_spec": "sdm-peer[gce]==0.1.0",
                                                   "code_url": ""}),
             "shutdown-script": cloudinit.shutdown_script(), md.SERVER_KEY: host.GUEST_SERVER,
             md.TOKEN_KEY: read_token(run.token_file), md.RUN_KEY: RUN, md.CONFIG_KEY: CONFIG, md.CORES_KEY: "1",
             md.MEMORY_KEY: "1"}
    return boot(VM, items, forwards={host.GUEST_SERVER: port})


STUDY, BUCKET = "study", "vm-bucket"
STUDY_SHAPES = [(1, 1), (1, 2)]  # configs c1-m1 and c1-m2, in this order


@pytest.fixture(scope="session")
def study(box, boot, tmp_path_factory):
    """A whole small study through the fake Compute API: a server on the host for 2 configs x 3
    experiments in groups of 1, one group at a time (max_vcpus 1), the run's wheel beside its
    replica in the bucket as bootstrap puts it, and the first group provisioned as bootstrap
    does once the database server answers. From there on nobody acts: the fake's managed groups
    boot their instances as QEMU VMs (host.QemuVms), whose workers hand off and remove their
    groups through the fake Compute API. (run, FakeCompute, QemuVms)."""
    run = RunDir(tmp_path_factory.mktemp("study-run") / "run")
    rows = [{"cores": cores, "memory_gb": memory, "i": i, "sleep": SHORT} for cores, memory in STUDY_SHAPES
            for i in range(3)]
    init(run, rows, provider="gce", project=host.PROJECT, zone=host.ZONE, run_name=STUDY, server=host.GUEST_SERVER,
         replica_url=f"gs://{BUCKET}/{STUDY}", max_vcpus=1, group_size=1, command=["python3", "-c", JOB])
    (box["buckets"] / BUCKET / STUDY).mkdir(parents=True)
    package.build_wheel(box["buckets"] / BUCKET / STUDY)
    port = free_port()
    server = start_server(run, port=port)
    vms = host.QemuVms(boot, {host.GUEST_SERVER: port})
    compute = vms.compute = FakeCompute(vms).start()
    vms.forwards[host.GUEST_COMPUTE] = compute.httpd.server_address[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SDM_GCE_API_ENDPOINT", compute.address)
        env.setenv("NO_GCE_CHECK", "true")
        client = server_client(run)
        provision_groups(client, provider_for(stored_settings(run), run.path, read_token(run.token_file)))
        client.close()
    yield run, compute, vms
    compute.stop()
    server.terminate()
    server.wait(30)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for vm in BOOTED:
            report.sections.append((f"guest {vm.name}", vm.diagnostics()))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vm-test figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def wait_for(predicate, timeout, what, vm=None, interval=1.0):
    """Poll until `predicate()` is truthy, while `vm` (if given) runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if vm is not None and vm.process.poll() is not None:
            break
        time.sleep(interval)
    raise AssertionError(f"no {what} after {timeout:.0f} s" + (" (the VM stopped)" if vm and vm.process.poll()
                                                                is not None else ""))

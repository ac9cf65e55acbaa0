"""`make vm-test`'s fixtures: the guest image, the host's fakes, and booting VMs under QEMU.
Where QEMU cannot run, every test fails with the reason: nothing here skips."""

import shutil
import time

import pytest

from ..fake_gce import FakeCompute
from . import host, image

FIGURES = {}  # what the closing summary prints: image build time, boot-to-first-claim per VM


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


@pytest.fixture(scope="module")
def boot(box, request):
    """boot(name, metadata items, **Vm options) -> a running Vm; all killed at the module's end.
    A failing test's report carries every VM's diagnostics (see pytest_runtest_makereport)."""
    started = []

    def start(name, items, forwards=None, **options):
        forwards = {host.GUEST_COMPUTE: box["compute"].httpd.server_address[1], **(forwards or {})}
        vm = host.Vm(name, items, image_dir=box["image"], services=box["services"], work_dir=box["work"],
                     accel=box["accel"], forwards=forwards, **options).start()
        started.append(vm)
        return vm

    request.module.booted_vms = started
    yield start
    for vm in started:
        vm.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for vm in getattr(item.module, "booted_vms", []):
            report.sections.append((f"guest {vm.name}", vm.diagnostics()))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vm-test figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def wait_for(predicate, timeout, what, vm=None, interval=1.0):
    """Poll until `predicate()` is truthy; on timeout fail with the guest's diagnostics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if vm is not None and vm.process.poll() is not None:
            break
        time.sleep(interval)
    raise AssertionError(f"no {what} after {timeout:.0f} s" + (f"\n{vm.diagnostics()}" if vm else ""))

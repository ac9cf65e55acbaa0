"""The guest image of `make vm-test`: Debian 12 as a Compute Engine VM runs it, built with
mmdebstrap from the Debian archive and cached under tests/.cache/vm/ by the hash of its recipe.

Recipe: this file, and the packages the cloud-configs name (their debs are pre-seeded into a
local apt repository inside the image, so the guest's `package_update`/`packages` run for real
and fetch nothing from outside). The image also carries the test's own pieces: pip's index is the
host's wheelhouse, and a report unit posts the guest's state (cloud-init, failed units and their
journal) to the host and the serial console."""

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdm_peer.providers.gce import cloudinit

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "vm"
# What a Compute Engine image has that matters here (kernel, systemd, cloud-init with its GCE
# datasource, the guest agent, python3) and the plain-DHCP networking bits; not what the
# cloud-configs install themselves (python3-venv, which Ubuntu's cloud images lack, and git).
PACKAGES = ["linux-image-cloud-amd64", "systemd-sysv", "udev", "cloud-init", "google-guest-agent",
            "ca-certificates", "python3", "iproute2", "ifupdown", "isc-dhcp-client", "netbase",
            "locales",  # cloud-init's locale module runs locale-gen
            "dbus"]  # without it no systemd-logind, and nothing acts on the ACPI power button
# Fixed guest-side addresses of the host's fakes (QEMU guestfwd, see host.py).
METADATA_IP = "169.254.169.254"
SERVICES_IP = "169.254.169.253"
SERVER_IP = "169.254.169.252"
COMPUTE_IP = "169.254.169.251"
BUCKET_MOUNT = "/mnt/bucket"
LOCAL_APT = "/var/local/sdm-apt"

REPORT = r'''#!/usr/bin/python3
# vm-test only: what a person needs when the guest goes wrong, posted to the host's fake and
# printed on the serial console every few seconds, from early boot to power-off.
import json, socket, subprocess, time, urllib.request

def run(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except Exception as exc:
        return f"{argv[0]}: {exc}"

sent, full, last_full = None, {}, 0.0
while True:
    # Cheap looks every 10 s; cloud-init (a python start: seconds of the guest's CPU under TCG)
    # and the journals when they change, or every five minutes.
    failed = [line.split()[0] for line in run("systemctl", "--failed", "--plain", "--no-legend").splitlines() if line.strip()]
    cheap = {"system": run("systemctl", "is-system-running").strip(), "failed": failed,
             "jobs": run("systemctl", "list-jobs", "--no-legend")}
    if cheap["system"] != full.get("system") or failed != full.get("failed") or time.monotonic() - last_full > 300:
        full = {"cloud_init": run("cloud-init", "status", "--long"),
                "journal": {unit: run("journalctl", "-b", "-u", unit, "-n", "40", "--no-pager")
                            for unit in failed + ["google-guest-agent", "sdm-peer-worker", "sdm-peer-serve",
                                                  "google-shutdown-scripts", "cloud-final"]}}
        last_full = time.monotonic()
    full.update(cheap)
    full["processes"] = run("ps", "-eo", "args")
    report = {"hostname": socket.gethostname(), "uptime": float(open("/proc/uptime").read().split()[0]), **full}
    summary = f"sdm-vm-report: up {report['uptime']:.0f}s system={report['system']} failed={failed} " \
              f"cloud-init={report['cloud_init'].splitlines()[0] if report['cloud_init'] else '?'}"
    if summary != sent:
        with open("/dev/ttyS0", "w") as console:
            console.write(summary + "\n")
        sent = summary
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://SERVICES_IP/report", data=json.dumps(report).encode(),
                                                      headers={"Content-Type": "application/json"}), timeout=10)
    except Exception:
        pass
    time.sleep(10)
'''.replace("SERVICES_IP", SERVICES_IP)

REPORT_UNIT = """[Unit]
Description=vm-test only: report the guest's state to the host and the serial console
DefaultDependencies=no
After=local-fs.target

[Service]
ExecStart=/usr/local/sbin/sdm-vm-report
Restart=always

[Install]
WantedBy=sysinit.target
"""


def recipe_hash():
    recipe = Path(__file__).read_bytes() + " ".join(cloudinit.PACKAGES).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def _write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _apt_index(repo):
    """A flat apt repository's Packages file for the debs in `repo`."""
    stanzas = []
    for deb in sorted(repo.glob("*.deb")):
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
        data = deb.read_bytes()
        stanzas.append(control.rstrip("\n") + f"\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    (repo / "Packages").write_text("\n".join(stanzas))


def build(target, log):
    """The image's root tree, then an ext4 disk image of it (no mount needed)."""
    rootfs = target / "rootfs"
    seeded = " ".join(cloudinit.PACKAGES)
    subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         "--aptopt=Acquire::Languages \"none\"",
         f"--customize-hook=chroot \"$1\" apt-get clean && chroot \"$1\" apt-get install --download-only -y --no-install-recommends {seeded}",
         # As a cloud image: the default locale generated and set (else cloud-init's locale module
         # generates it at every first boot).
         "--customize-hook=sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' \"$1/etc/locale.gen\" && chroot \"$1\" locale-gen"
         " && echo LANG=en_US.UTF-8 > \"$1/etc/default/locale\"",
         f"--customize-hook=mkdir -p \"$1{LOCAL_APT}\" && mv \"$1\"/var/cache/apt/archives/*.deb \"$1{LOCAL_APT}/\"",
         "bookworm", str(rootfs)], check=True, stdout=log, stderr=subprocess.STDOUT)
    _apt_index(rootfs / LOCAL_APT.lstrip("/"))
    # The guest's apt sees the pre-seeded repository only; pip sees the host's wheelhouse only.
    for sources in [rootfs / "etc/apt/sources.list", *(rootfs / "etc/apt/sources.list.d").glob("*")]:
        sources.unlink()
    _write(rootfs / "etc/apt/sources.list.d/sdm-local.list", f"deb [trusted=yes] file:{LOCAL_APT} ./\n")
    _write(rootfs / "etc/pip.conf", f"[global]\nindex-url = http://{SERVICES_IP}/simple/\n"
                                    f"trusted-host = {SERVICES_IP}\ndisable-pip-version-check = true\n")
    # The bucket: a second disk (the cloud kernel has no 9p), mounted where file:// replicas point.
    _write(rootfs / "etc/fstab", f"/dev/vda / ext4 defaults 0 1\n/dev/vdb {BUCKET_MOUNT} ext4 nofail,"
                                 "x-systemd.device-timeout=90s 0 2\n")
    # The test hooks (DESIGN §6): the worker provisions through the host's fake Compute API, and
    # the cloud-configs' fetch_wheel.py (run by cloud-final) downloads the run's wheel from the
    # host's Cloud Storage fake.
    _write(rootfs / "etc/systemd/system" / f"{cloudinit.WORKER_UNIT}.d/vm-test.conf",
           f"[Service]\nEnvironment=SDM_GCE_API_ENDPOINT={COMPUTE_IP}:80\n")
    _write(rootfs / "etc/systemd/system/cloud-final.service.d/vm-test.conf",
           f"[Service]\nEnvironment=SDM_GCS_API_ENDPOINT={SERVICES_IP}:80\n")
    with open(rootfs / "etc/hosts", "a") as hosts:
        hosts.write(f"{METADATA_IP} metadata.google.internal metadata\n")
    _write(rootfs / "usr/local/sbin/sdm-vm-report", REPORT, 0o755)
    _write(rootfs / "etc/systemd/system/sdm-vm-report.service", REPORT_UNIT)
    (rootfs / "etc/systemd/system/sysinit.target.wants").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/systemd/system/sysinit.target.wants/sdm-vm-report.service").symlink_to(
        "/etc/systemd/system/sdm-vm-report.service")
    kernel = sorted((rootfs / "boot").glob("vmlinuz-*"))[-1]
    initrd = sorted((rootfs / "boot").glob("initrd.img-*"))[-1]
    shutil.copy(kernel, target / "vmlinuz")
    shutil.copy(initrd, target / "initrd.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), "-L", "root", str(target / "disk.img"), "3G"],
                   check=True, stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(rootfs)


def image():
    """(directory with vmlinuz, initrd.img, disk.img; seconds spent building, 0 when cached)."""
    target = CACHE / f"debian12-{recipe_hash()}"
    if (target / "disk.img").exists():
        return target, 0.0
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    started = time.monotonic()
    with open(CACHE / f"build-{target.name}.log", "wb") as log:
        try:
            build(target, log)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    for old in CACHE.glob("debian12-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    for old in CACHE.glob("build-debian12-*.log"):
        if old.stem != f"build-{target.name}":
            old.unlink()
    return target, time.monotonic() - started


if __name__ == "__main__":
    where, seconds = image()
    print(f"{where} ({'built in %.0f s' % seconds if seconds else 'cached'})", file=sys.stderr)

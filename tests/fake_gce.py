"""A fake Compute Engine REST API, a fake metadata server and fake VMs, all on 127.0.0.1.

FakeCompute keeps instance templates, managed instance groups, instances and firewall rules in
memory and answers like Compute Engine: real-shaped Operation replies (RUNNING at once, DONE when
waited on), 409 for a resource that exists, 404 for one that does not, 400 for a template still
used by a group, and any refusal a test asks for (429, 403 quota, 403 permission, ...). The
real google-cloud-compute client talks to it over plain HTTP.

LocalVms "boots" a VM the way cloud-init would, as far as sdm-peer is concerned: it applies the
user-data's write_files under the VM's own root directory and runs the systemd unit's ExecStart
as a local process, with the VM paths mapped there and SDM_METADATA_URL pointing at the fake
metadata server. Stopping a VM sends SIGTERM and runs its shutdown-script, as a preemption does."""

import itertools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from sdm_peer.providers.gce import cloudinit

API = "https://www.googleapis.com/compute/v1"


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 run in a thread, stopped by stop()."""

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.handle(self, "GET")

            def do_POST(self):
                owner.handle(self, "POST")

            def do_DELETE(self):
                owner.handle(self, "DELETE")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    @staticmethod
    def reply(handler, status, payload, content_type="application/json"):
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


class ApiError(Exception):
    def __init__(self, status, reason, message):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def payload(self):
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


class FakeCompute(_Server):
    def __init__(self, vms=None):
        self.vms = vms
        self.templates, self.groups, self.instances, self.firewalls = {}, {}, {}, {}
        self.operations = {}
        self.requests = []  # (method, path, body) of every request, in order
        self._faults = []  # [method, path regex, ApiError, times left]
        self._operation_faults = []  # [method, path regex, code, message, times left]
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._query = {}  # the query string of the request being answered

    # ------------------------------------------------------------ what tests ask for

    def fail(self, method, pattern, status, reason, message="refused on purpose", times=1):
        """Answer the next `times` requests matching with this HTTP error."""
        self._faults.append([method, re.compile(pattern), ApiError(status, reason, message), times])

    def fail_operation(self, method, pattern, code, message, times=1):
        """Accept the next matching request, but finish its operation with this error."""
        self._operation_faults.append([method, re.compile(pattern), code, message, times])

    def calls(self, method=None, pattern=""):
        return [(m, p, b) for m, p, b in self.requests if (method is None or m == method) and re.search(pattern, p)]

    # ------------------------------------------------------------ HTTP

    def handle(self, handler, method):
        path, _, query = handler.path.partition("?")
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        with self._lock:
            self.requests.append((method, path, body))
            self._query = urllib.parse.parse_qs(query)
            try:
                status, payload = 200, self._route(method, path, body)
            except ApiError as exc:
                status, payload = exc.status, exc.payload()
            except Exception as exc:  # a bug in the fake: answer, so the test fails instead of hanging
                status, payload = 500, ApiError(500, "internalError", f"fake: {exc!r}").payload()
        self.reply(handler, status, payload)

    def _take(self, faults, method, path):
        for fault in faults:
            if fault[0] == method and fault[1].search(path) and fault[-1] > 0:
                fault[-1] -= 1
                return fault
        return None

    def _route(self, method, path, body):
        fault = self._take(self._faults, method, path)
        if fault:
            raise fault[2]
        match = re.fullmatch(r"/compute/v1/projects/([^/]+)/(.*)", path)
        if not match:
            raise ApiError(404, "notFound", f"no such path {path}")
        project, rest = match.groups()
        for pattern, handler in (
            (r"global/instanceTemplates(?:/([^/]+))?", self._templates),
            (r"zones/([^/]+)/instanceGroupManagers/([^/]+)/deleteInstances", self._delete_instances),
            (r"zones/([^/]+)/instanceGroupManagers(?:/([^/]+))?", self._groups),
            (r"zones/([^/]+)/instances(?:/([^/]+))?", self._instances),
            (r"global/firewalls(?:/([^/]+))?", self._firewalls),
            (r"(?:zones/([^/]+)/)?(?:global/)?operations/([^/]+)(/wait)?", self._operation),
        ):
            found = re.fullmatch(pattern, rest)
            if found:
                return handler(method, project, body, path, *found.groups())
        raise ApiError(404, "notFound", f"no such path {path}")

    def _new_operation(self, method, path, project, kind, target, zone=None):
        name = f"operation-{next(self._ids)}-{secrets.token_hex(4)}"
        fault = self._take(self._operation_faults, method, path)
        operation = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
                     "operationType": kind, "status": "RUNNING", "progress": 0,
                     "targetLink": f"{API}/projects/{project}/{target}",
                     "selfLink": f"{API}/projects/{project}/{'zones/' + zone if zone else 'global'}/operations/{name}",
                     "insertTime": "2024-01-01T00:00:00.000-00:00", "user": "someone@example.com"}
        if zone:
            operation["zone"] = f"{API}/projects/{project}/zones/{zone}"
        if fault:
            operation["error"] = {"errors": [{"code": fault[2], "message": fault[3]}]}
        self.operations[name] = operation
        return dict(operation)

    def _operation(self, method, project, body, path, zone, name, wait):
        if name not in self.operations:
            raise ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        operation = self.operations[name]
        if wait:  # one wait is enough: the fake does its work at once
            operation.update(status="DONE", progress=100, endTime="2024-01-01T00:00:01.000-00:00")
            if "error" in operation:
                operation.update(httpErrorStatusCode=403, httpErrorMessage="FORBIDDEN")
        return dict(operation)

    def _collection(self, store, kind, method, project, body, path, name, zone=None, on_insert=None,
                    on_delete=None, check_delete=None):
        where = f"projects/{project}/{'zones/' + zone if zone else 'global'}/{kind}"
        if method == "POST" and name is None:
            name = body["name"]
            if name in store:
                raise ApiError(409, "alreadyExists", f"The resource '{where}/{name}' already exists")
            operation = self._new_operation(method, path, project, "insert", f"{where.split('/', 2)[2]}/{name}", zone)
            if "error" not in operation:
                store[name] = body
                if on_insert:
                    on_insert(name, body)
            return operation
        if method == "GET" and name is None:
            return self._list(store, kind, where)
        if name not in store:
            raise ApiError(404, "notFound", f"The resource '{where}/{name}' was not found")
        if method == "GET":
            return store[name]
        if method == "DELETE":
            if check_delete:
                check_delete(name)
            operation = self._new_operation(method, path, project, "delete", f"{where.split('/', 2)[2]}/{name}", zone)
            if "error" not in operation:
                deleted = store.pop(name)
                if on_delete:
                    on_delete(name, deleted)
            return operation
        raise ApiError(405, "badRequest", f"{method} not allowed here")

    def _list(self, store, kind, where):
        """GET on a collection: every item, or those whose name the `name eq "RE2"` filter matches
        whole (the only filter sdm-peer sends); one page."""
        wanted = (self._query.get("filter") or [None])[0]
        if wanted is not None:
            found = re.fullmatch(r'name eq "(.*)"', wanted)
            if not found:
                raise ApiError(400, "invalid", f"fake: unsupported filter {wanted!r}")
            pattern = re.compile(found.group(1))
        items = [body for name, body in store.items() if wanted is None or pattern.fullmatch(name)]
        return {"kind": f"compute#{kind[:-1]}List", "id": where, "items": items, "selfLink": f"{API}/{where}"}

    def _templates(self, method, project, body, path, name):
        def in_use(name):
            for group, record in self.groups.items():
                if record["instanceTemplate"].endswith(f"/instanceTemplates/{name}"):
                    raise ApiError(400, "resourceInUseByAnotherResource",
                                   f"The instance_template resource 'projects/{project}/global/instanceTemplates/"
                                   f"{name}' is already being used by 'instanceGroupManagers/{group}'")
        return self._collection(self.templates, "instanceTemplates", method, project, body, path, name,
                                check_delete=in_use)

    def _groups(self, method, project, body, path, zone, name):
        if method == "POST" and name is None:
            template = body["instanceTemplate"].rpartition("/")[2]
            if template not in self.templates:
                raise ApiError(404, "notFound", f"The resource 'projects/{project}/global/instanceTemplates/"
                                                f"{template}' was not found")
        return self._collection(self.groups, "instanceGroupManagers", method, project, body, path, name, zone,
                                on_insert=self._start_group, on_delete=self._stop_group)

    def _delete_instances(self, method, project, body, path, zone, name):
        """POST .../instanceGroupManagers/G/deleteInstances: the VMs go and the target size drops."""
        if method != "POST":
            raise ApiError(405, "badRequest", f"{method} not allowed here")
        where = f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}"
        if name not in self.groups:
            raise ApiError(404, "notFound", f"The resource '{where}' was not found")
        group = self.groups[name]
        leaving = [url.rpartition("/")[2] for url in body["instances"]]
        if body.get("skipInstancesOnValidationError"):  # as Compute Engine: non-members are skipped
            leaving = [instance for instance in leaving if instance in group["_instances"]]
        for instance in leaving:
            if instance not in group["_instances"]:
                raise ApiError(400, "invalid", f"instance {instance} is not a member of {where}")
        operation = self._new_operation(method, path, project, "deleteInstances",
                                        f"zones/{zone}/instanceGroupManagers/{name}", zone)
        if "error" not in operation:
            for instance in leaving:
                group["_instances"].remove(instance)
                group["targetSize"] -= 1
                self._stop_vm(instance)
        return operation

    def _instances(self, method, project, body, path, zone, name):
        return self._collection(self.instances, "instances", method, project, body, path, name, zone,
                                on_insert=self._start_instance, on_delete=lambda name, _: self._stop_vm(name))

    def _firewalls(self, method, project, body, path, name):
        return self._collection(self.firewalls, "firewalls", method, project, body, path, name)

    # ------------------------------------------------------------ VMs

    def _start_group(self, name, body):
        template = self.templates[body["instanceTemplate"].rpartition("/")[2]]
        body["_instances"] = [f"{body['baseInstanceName']}-{secrets.token_hex(2)}" for _ in range(body["targetSize"])]
        if self.vms:
            for instance in body["_instances"]:
                self.vms.start(instance, template["properties"]["metadata"])

    def _stop_group(self, name, body):
        for instance in body["_instances"]:
            self._stop_vm(instance)

    def _start_instance(self, name, body):
        if self.vms:
            self.vms.start(name, body["metadata"])

    def _stop_vm(self, name):
        if self.vms:
            self.vms.stop(name)


class FakeMetadata(_Server):
    """The metadata server of every fake VM: /VM/computeMetadata/v1/instance/..."""

    def __init__(self):
        self.vms = {}

    def url_for(self, vm):
        return f"http://{self.address}/{vm}/computeMetadata/v1"

    def handle(self, handler, method):
        match = re.fullmatch(r"/([^/]+)/computeMetadata/v1/instance/(name|attributes/([^/]+))", handler.path)
        if handler.headers.get("Metadata-Flavor") != "Google":
            return self.reply(handler, 403, "Missing Metadata-Flavor:Google header.", "text/plain")
        if not match or match.group(1) not in self.vms:
            return self.reply(handler, 404, "not found", "text/plain")
        vm, what, key = match.groups()
        value = vm if what == "name" else self.vms[vm].get(key)
        if value is None:
            return self.reply(handler, 404, "not found", "text/plain")
        return self.reply(handler, 200, value, "application/text")


def unit_exec_start(unit_text):
    """The ExecStart command line of a systemd unit, as an argument list."""
    line = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    return [arg.replace("%%", "%").replace("$$", "$") for arg in shlex.split(line.partition("=")[2])]


def localize(argv, root):
    """A VM's command line as it runs here: sdm-peer from this checkout, the VM's directories
    under `root`, and the VM's "all interfaces" as this machine's loopback."""
    if argv[0] == cloudinit.VM_SDM_PEER:
        argv = [sys.executable, "-m", "sdm_peer", *argv[1:]]
    out = []
    for arg in argv:
        for vm_dir in (cloudinit.VM_STATE_DIR, cloudinit.VM_ETC_DIR, "/opt/sdm-peer"):
            if arg.startswith(vm_dir):
                arg = str(root) + arg
        out.append("127.0.0.1" if arg == "0.0.0.0" else arg)
    return out


class LocalVms:
    """Fake VMs: cloud-init's write_files and the systemd unit's ExecStart, as local processes."""

    def __init__(self, root, metadata, env=None):
        self.root, self.metadata, self.env = Path(root), metadata, env or {}
        self.processes = {}  # name -> Popen of the VM's service
        self.started = []  # names in boot order
        self.shutdown_scripts = []  # Popen of every shutdown-script run
        self.reboots = []  # threads booting preempted VMs again
        self.servers = set()  # VMs whose service is the database server

    def start(self, name, metadata):
        items = {item["key"]: item["value"] for item in metadata.get("items", [])}
        self.metadata.vms[name] = items
        root = self.root / name
        cloud_config = yaml.safe_load(items["user-data"])
        unit = None
        for entry in cloud_config.get("write_files", []):
            target = root / entry["path"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(entry["content"])
            target.chmod(int(entry.get("permissions", "0644"), 8))
            if entry["path"].endswith(".service"):
                unit = entry["content"]
                if entry["path"].endswith(cloudinit.SERVE_UNIT):
                    self.servers.add(name)
        workdir = next(line.partition("=")[2] for line in unit.splitlines() if line.startswith("WorkingDirectory="))
        (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        argv = localize(unit_exec_start(unit), root)
        log = open(root / "service.log", "ab")
        self.processes[name] = subprocess.Popen(argv, cwd=root / workdir.lstrip("/"), stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=log, env=self._env(name), start_new_session=True)
        self.started.append(name)

    def _env(self, name):
        return {**os.environ, **self.env, "SDM_METADATA_URL": self.metadata.url_for(name), "NO_GCE_CHECK": "true"}

    def stop(self, name):
        """What a preemption or a deletion does: SIGTERM to the service, the shutdown-script."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        self.run_shutdown_script(name)

    def run_shutdown_script(self, name):
        """Start the VM's shutdown-script (its last line: the command) as it would run there."""
        script = self.metadata.vms.get(name, {}).get("shutdown-script")
        if script:
            command = next(line for line in reversed(script.splitlines()) if line.strip())
            log = open(self.root / name / "shutdown.log", "ab")
            self.shutdown_scripts.append(subprocess.Popen(
                localize(shlex.split(command), self.root / name), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self._env(name)))
            return self.shutdown_scripts[-1]

    def preempt(self, name, reboot_after=0.5):
        """A spot preemption: stop the VM; its managed group boots it again shortly after."""
        items = self.metadata.vms[name]
        self.stop(name)
        process = self.processes[name]

        def reboot():
            process.wait(30)
            time.sleep(reboot_after)
            self.start(name, {"items": [{"key": key, "value": value} for key, value in items.items()]})
        self.reboots.append(threading.Thread(target=reboot, daemon=True))
        self.reboots[-1].start()

    def alive(self):
        return [name for name, process in self.processes.items() if process.poll() is None]

    def stop_all(self, timeout=25.0):
        """Workers first, so they can still give their leases back, then database servers."""
        for reboot in self.reboots:
            reboot.join(timeout)
        workers = [name for name in self.processes if name not in self.servers]
        for names in (workers, list(self.servers)):
            for name in names:
                if self.processes[name].poll() is None:
                    os.killpg(self.processes[name].pid, signal.SIGTERM)
            for process in [*(self.processes[name] for name in names), *self.shutdown_scripts]:
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

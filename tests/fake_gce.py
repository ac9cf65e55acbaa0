"""A fake Compute Engine REST API, a fake metadata server and fake VMs, all on 127.0.0.1.

FakeCompute keeps instance templates, managed instance groups, instances and firewall rules in
memory and answers like Compute Engine (see its docstring): bodies checked against the API's
discovery document, real-shaped Operation replies, 409 for a resource that exists, 404 for one
that does not, 400 for a template still used by a group, groups whose VMs appear over time or
fail to, and any refusal a test asks for (429, 403 quota, 403 permission, ...). The real
google-cloud-compute client talks to it over plain HTTP.

LocalVms "boots" a VM of a cloud-init image the way cloud-init would, as far as sdm-peer is
concerned: it applies the user-data's write_files under the VM's own root directory and runs the
systemd unit's ExecStart as a local process, with the VM paths mapped there and SDM_METADATA_URL
pointing at the fake metadata server. Stopping a VM sends SIGTERM and runs its shutdown-script,
as a preemption does."""

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

from . import gce_discovery as discovery

API = "https://www.googleapis.com/compute/v1"


class HttpServer:
    """A ThreadingHTTPServer on 127.0.0.1 run in a thread, stopped by stop(); its
    `handle(request, method)` answers."""

    protocol_version = "HTTP/1.0"

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = owner.protocol_version

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
    def port(self):
        return self.httpd.server_address[1]

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    @staticmethod
    def reply(handler, status, payload, content_type="application/json", headers=(), close=False):
        """Answer with `payload` (bytes, text, or an object sent as JSON); `close`: and close the
        connection (HTTP/1.1 keeps it open otherwise)."""
        data = (payload if isinstance(payload, bytes) else payload.encode() if isinstance(payload, str)
                else json.dumps(payload).encode())
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        if close:
            handler.send_header("Connection", "close")
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
        if close:
            handler.close_connection = True


class ApiError(Exception):
    def __init__(self, status, reason, message):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def payload(self):
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


class CallerGone(Exception):
    """The VM that made the request was deleted by it: no answer ever reaches it."""


# Images whose guest environment runs cloud-init (so reads `user-data`); others ignore it.
CLOUD_INIT_IMAGE_PROJECTS = {"ubuntu-os-cloud", "ubuntu-os-pro-cloud", "cos-cloud"}
IMAGE = re.compile(r"(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?projects/([^/]+)/global/images/"
                   r"(?:family/)?[a-z][-a-z0-9]*")
# A VM's vCPUs count against CPUS_ALL_REGIONS (the project's), and in its region against
# PREEMPTIBLE_CPUS when it is a spot VM and that quota is above 0, else against CPUS and its
# family's own metric (N1 has none; E2 counts on CPUS alone here).
CPU_METRIC = {"n2": "N2_CPUS", "n2d": "N2D_CPUS", "c2": "C2_CPUS", "c2d": "C2D_CPUS", "c3": "C3_CPUS"}
REGION_METRICS = ("CPUS", "PREEMPTIBLE_CPUS", "IN_USE_ADDRESSES", "INSTANCE_GROUP_MANAGERS", *CPU_METRIC.values())
PROJECT_METRICS = ("CPUS_ALL_REGIONS", "INSTANCE_TEMPLATES")
PLENTY = 10_000.0
# A new project's: its spot VMs count as standard ones.
DEFAULT_LIMITS = {"PREEMPTIBLE_CPUS": 0.0}


def machine_family(machine_type):
    """n2-custom-4-16384 -> n2; custom-1-2048 -> n1; e2-small -> e2."""
    return "n1" if machine_type.startswith("custom-") else machine_type.partition("-")[0]


def vcpus(machine_type):
    custom = re.search(r"custom-(\d+)-\d+", machine_type)
    if custom:
        return int(custom.group(1))
    size = re.search(r"-(\d+)$", machine_type)
    return int(size.group(1)) if size else 2  # e2-small, e2-medium: 2 shared vCPUs


def region_of(zone):
    return zone.rpartition("-")[0]


class FakeCompute(HttpServer):
    """Compute Engine as its REST API behaves, for what sdm-peer asks of it.

    * Every request body is checked against the compute v1 discovery document and the documented
      rules beyond it (gce_discovery.py): 400 as the API would answer.
    * A managed group's insert is DONE before any VM exists; its VMs appear over time
      (`vm_delay`), and quota (`quotas`, what regions.get and projects.get serve), stockouts
      (`stockouts`: zones; `spot_stockouts`: zones without spot VMs)
      and machine types a zone lacks (`missing_families`) show only in listManagedInstances and
      listErrors, retried every `retry_delay` as a group retries. A single VM's insert (the
      database VM) is accepted and its operation ends with the same error instead.
    * Some operations are still RUNNING when `wait` returns; lists come `page_size` at a time.
    * A VM that deletes its own managed group is gone before the answer reaches it.
    * Networks: `default` (auto mode); `add_network` makes a custom-mode one, whose VMs must name
      a subnetwork of it."""

    def __init__(self, vms=None, *, vm_delay=0.05, retry_delay=0.5, page_size=2):
        self.vms = vms
        self.vm_delay, self.retry_delay, self.page_size = vm_delay, retry_delay, page_size
        self.templates, self.groups, self.instances, self.firewalls = {}, {}, {}, {}
        self.networks = {"default": {"name": "default", "autoCreateSubnetworks": True, "subnetworks": {}}}
        self.quotas = {}  # metric -> limit (in every region); not named: DEFAULT_LIMITS, else plenty
        self.stockouts = set()  # zones without capacity
        self.spot_stockouts = set()  # zones without spot capacity (standard VMs still made)
        self.missing_families = {}  # zone -> machine families it does not offer
        self.operations = {}
        self.requests = []  # (method, path, body) of every request, in order
        self._faults = []  # [method, path regex, ApiError, times left]
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._timers = []
        self._query = {}  # the query string of the request being answered
        self._caller = None  # the VM making the request being answered, if one did

    # ------------------------------------------------------------ what tests ask for

    def fail(self, method, pattern, status, reason, message="refused on purpose", times=1):
        """Answer the next `times` requests matching with this HTTP error."""
        self._faults.append([method, re.compile(pattern), ApiError(status, reason, message), times])

    def add_network(self, name, subnetworks):
        """A custom-mode network with `subnetworks`: {region: [names]}."""
        self.networks[name] = {"name": name, "autoCreateSubnetworks": False, "subnetworks": subnetworks}

    def drop_group(self, name):
        """A group deleted behind sdm-peer's back (its VMs with it; its template stays)."""
        with self._lock:
            self._stop_group(name, self.groups.pop(name))

    def calls(self, method=None, pattern=""):
        return [(m, p, b) for m, p, b in self.requests if (method is None or m == method) and re.search(pattern, p)]

    def stop(self):
        with self._lock:
            for timer in self._timers:
                timer.cancel()
        super().stop()

    # ------------------------------------------------------------ HTTP

    def handle(self, handler, method):
        path, _, query = handler.path.partition("?")
        caller = re.match(r"/vm/([^/]+)(/.*)", path)
        if caller:
            path = caller.group(2)
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        with self._lock:
            self.requests.append((method, path, body))
            self._query = urllib.parse.parse_qs(query)
            self._caller = caller and caller.group(1)
            try:
                status, payload = 200, self._route(method, path, body)
            except ApiError as exc:
                status, payload = exc.status, exc.payload()
            except CallerGone:
                handler.close_connection = True
                return
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
        project = re.fullmatch(r"/compute/v1/projects/([^/]+)", path)
        if project:
            return self._project(method, project.group(1))
        match = re.fullmatch(r"/compute/v1/projects/([^/]+)/(.*)", path)
        if not match:
            raise ApiError(404, "notFound", f"no such path {path}")
        project, rest = match.groups()
        for pattern, handler in (
            (r"global/instanceTemplates(?:/([^/]+))?", self._templates),
            (r"zones/([^/]+)/instanceGroupManagers/([^/]+)/(deleteInstances|listManagedInstances|listErrors)",
             self._group_method),
            (r"zones/([^/]+)/instanceGroupManagers(?:/([^/]+))?", self._groups),
            (r"zones/([^/]+)/instances(?:/([^/]+))?", self._instances),
            (r"global/firewalls(?:/([^/]+))?", self._firewalls),
            (r"regions/([^/]+)", self._region),
            (r"(?:zones/([^/]+)/)?(?:global/)?operations/([^/]+)(/wait)?", self._operation),
        ):
            found = re.fullmatch(pattern, rest)
            if found:
                return handler(method, project, body, path, *found.groups())
        raise ApiError(404, "notFound", f"no such path {path}")

    @staticmethod
    def _checked(method_id, schema, body):
        try:
            discovery.check_body(method_id, schema, body)
        except discovery.Invalid as exc:
            raise ApiError(400, exc.reason, str(exc)) from None

    def _new_operation(self, project, kind, target, zone=None, error=None):
        """An Operation, RUNNING until waited on; `error`: the (code, message) it ends with."""
        number = next(self._ids)
        name = f"operation-{number}-{secrets.token_hex(4)}"
        operation = {"kind": "compute#operation", "id": str(number), "name": name,
                     "operationType": kind, "status": "RUNNING", "progress": 0,
                     "targetLink": f"{API}/projects/{project}/{target}",
                     "selfLink": f"{API}/projects/{project}/{'zones/' + zone if zone else 'global'}/operations/{name}",
                     "insertTime": "2024-01-01T00:00:00.000-00:00", "user": "someone@example.com"}
        if zone:
            operation["zone"] = f"{API}/projects/{project}/zones/{zone}"
        if error:
            operation["error"] = {"errors": [{"code": error[0], "message": error[1]}]}
        # `wait` returns after at most two minutes, done or not: every other operation needs two.
        self.operations[name] = {**operation, "_waits": 1 + number % 2}
        return operation

    def _operation(self, method, project, body, path, zone, name, wait):
        if name not in self.operations:
            raise ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        operation = self.operations[name]
        if wait:
            operation["_waits"] -= 1
            if operation["_waits"] <= 0:
                operation.update(status="DONE", progress=100, endTime="2024-01-01T00:00:01.000-00:00")
                if "error" in operation:
                    operation.update(httpErrorStatusCode=403, httpErrorMessage="FORBIDDEN")
        return {key: value for key, value in operation.items() if not key.startswith("_")}

    def _collection(self, store, kind, method, project, body, path, name, zone=None, on_insert=None,
                    on_delete=None, check_delete=None, refuse_insert=None):
        """Insert, list, get and delete in one collection. `refuse_insert(body)`: the (code,
        message) an accepted insert's operation ends with instead of creating it, or None."""
        where = f"projects/{project}/{'zones/' + zone if zone else 'global'}/{kind}"
        if method == "POST" and name is None:
            name = body["name"]
            if name in store:
                raise ApiError(409, "alreadyExists", f"The resource '{where}/{name}' already exists")
            operation = self._new_operation(project, "insert", f"{where.split('/', 2)[2]}/{name}", zone,
                                            error=refuse_insert and refuse_insert(body))
            if "error" not in operation:
                store[name] = body
                if on_insert:
                    on_insert(name, body)
            return operation
        if method == "GET" and name is None:
            return self._list(store.values(), f"compute#{kind[:-1]}List", where, "items")
        if name not in store:
            raise ApiError(404, "notFound", f"The resource '{where}/{name}' was not found")
        if method == "GET":
            return {key: value for key, value in store[name].items() if not key.startswith("_")}
        if method == "DELETE":
            if check_delete:
                check_delete(name)
            operation = self._new_operation(project, "delete", f"{where.split('/', 2)[2]}/{name}", zone)
            if "error" not in operation:
                deleted = store.pop(name)
                if on_delete:
                    on_delete(name, deleted)
            return operation
        raise ApiError(405, "badRequest", f"{method} not allowed here")

    def _list(self, records, kind, where, field):
        """One page (`page_size` items from `pageToken`) of the records whose name the filter
        `name eq "RE2"` matches whole (the only filter sdm-peer sends)."""
        wanted = (self._query.get("filter") or [None])[0]
        if wanted is not None:
            found = re.fullmatch(r'name eq "(.*)"', wanted)
            if not found:
                raise ApiError(400, "invalid", f"fake: unsupported filter {wanted!r}")
            pattern = re.compile(found.group(1))
        items = [{key: value for key, value in record.items() if not key.startswith("_")} for record in records
                 if wanted is None or pattern.fullmatch(record.get("name") or record.get("instance", ""))]
        start = int((self._query.get("pageToken") or ["0"])[0])
        page = {field: items[start:start + self.page_size]}
        if kind:  # a resource list (the group's own lists have neither kind nor links)
            page.update(kind=kind, id=where, selfLink=f"{API}/{where}")
        if start + self.page_size < len(items):
            page["nextPageToken"] = str(start + self.page_size)
        return page

    def _templates(self, method, project, body, path, name):
        def in_use(name):
            for group, record in self.groups.items():
                if record["instanceTemplate"].endswith(f"/instanceTemplates/{name}"):
                    raise ApiError(400, "resourceInUseByAnotherResource",
                                   f"The instance_template resource 'projects/{project}/global/instanceTemplates/"
                                   f"{name}' is already being used by 'instanceGroupManagers/{group}'")
        if method == "POST" and name is None:
            self._checked("compute.instanceTemplates.insert", "InstanceTemplate", body)
            self._check_instance(body["properties"], single_instance=False, zone=None)
        return self._collection(self.templates, "instanceTemplates", method, project, body, path, name,
                                check_delete=in_use)

    def _check_instance(self, properties, *, single_instance, zone):
        try:
            discovery.check_instance_properties(properties, single_instance=single_instance, zone=zone)
        except discovery.Invalid as exc:
            raise ApiError(400, exc.reason, str(exc)) from None
        for disk in properties.get("disks", []):
            image = disk.get("initializeParams", {}).get("sourceImage")
            if image is not None and not IMAGE.fullmatch(image):
                raise ApiError(400, "invalid", f"Invalid value for field 'sourceImage': '{image}'.")
        for interface in properties.get("networkInterfaces", []):
            network = self.networks.get(interface.get("network", "global/networks/default").rpartition("/")[2])
            if network is None:
                raise ApiError(404, "notFound", f"The resource '{interface['network']}' was not found")
            subnetwork = interface.get("subnetwork")
            if not network["autoCreateSubnetworks"] and not subnetwork:
                raise ApiError(400, "invalid", "Invalid value for field 'resource.networkInterfaces[0]': ''. "
                                               "Subnetwork should be specified for custom subnetmode network")
            if subnetwork:
                found = re.fullmatch(r"(?:.*/)?regions/([^/]+)/subnetworks/([^/]+)|([a-z][-a-z0-9]*)", subnetwork)
                known = [sub for subs in network["subnetworks"].values() for sub in subs]
                if not found or (found.group(2) or found.group(3)) not in known or (
                        zone and found.group(1) and found.group(1) != region_of(zone)):
                    raise ApiError(400, "invalid", f"Invalid value for field 'subnetwork': '{subnetwork}'. "
                                                   "The referenced subnetwork resource cannot be found.")

    def _groups(self, method, project, body, path, zone, name):
        if method == "POST" and name is None:
            self._checked("compute.instanceGroupManagers.insert", "InstanceGroupManager", body)
            template = body["instanceTemplate"].rpartition("/")[2]
            if template not in self.templates:
                raise ApiError(404, "notFound", f"The resource 'projects/{project}/global/instanceTemplates/"
                                                f"{template}' was not found")
            body["zone"] = zone
        if method == "DELETE" and name in self.groups and self._caller in self.members(name):
            self._collection(self.groups, "instanceGroupManagers", method, project, body, path, name, zone,
                             on_delete=self._stop_group)
            raise CallerGone
        operation = self._collection(self.groups, "instanceGroupManagers", method, project, body, path, name, zone,
                                     on_insert=self._start_group, on_delete=self._stop_group)
        return operation

    def members(self, group):
        """The names of a managed group's VMs (made or being made)."""
        return [member["name"] for member in self.groups[group]["_members"]]

    def _group_method(self, method, project, body, path, zone, name, verb):
        if method != "POST" and verb == "deleteInstances" or method != "GET" and verb == "listErrors":
            raise ApiError(405, "badRequest", f"{method} not allowed here")
        where = f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}"
        if name not in self.groups:
            raise ApiError(404, "notFound", f"The resource '{where}' was not found")
        group = self.groups[name]
        if verb == "listManagedInstances":
            return self._list([self._managed_instance(group, member) for member in group["_members"]],
                              None, where, "managedInstances")
        if verb == "listErrors":
            return self._list(group["_errors"], None, where, "items")
        self._checked("compute.instanceGroupManagers.deleteInstances", "InstanceGroupManagersDeleteInstancesRequest",
                      body)
        leaving = [url.rpartition("/")[2] for url in body["instances"]]
        if body.get("skipInstancesOnValidationError"):  # as Compute Engine: non-members are skipped
            leaving = [instance for instance in leaving if instance in self.members(name)]
        for instance in leaving:
            if instance not in self.members(name):
                raise ApiError(400, "invalid", f"instance {instance} is not a member of {where}")
        operation = self._new_operation(project, "deleteInstances",
                                        f"zones/{zone}/instanceGroupManagers/{name}", zone)
        if "error" not in operation:
            group["_members"] = [member for member in group["_members"] if member["name"] not in leaving]
            for instance in leaving:
                group["targetSize"] -= 1
                self._remove_vm(instance)
        return operation

    def _managed_instance(self, group, member):
        record = {"instance": f"{API}/projects/{group['_project']}/zones/{group['zone']}/instances/{member['name']}",
                  "name": member["name"], "currentAction": "CREATING" if member["status"] is None else "NONE",
                  "id": member["id"]}
        if member["status"]:
            record["instanceStatus"] = member["status"]
        if member["errors"]:
            record["lastAttempt"] = {"errors": {"errors": member["errors"]}}
        return record

    def _instances(self, method, project, body, path, zone, name):
        if method == "POST" and name is None:
            self._checked("compute.instances.insert", "Instance", body)
            self._check_instance(body, single_instance=True, zone=zone)
        # A single VM's quota, stockout or missing machine type ends its insert operation.
        return self._collection(self.instances, "instances", method, project, body, path, name, zone,
                                on_insert=self._start_instance, on_delete=lambda name, _: self._stop_vm(name),
                                refuse_insert=lambda body: self._why_not(project, zone, body))

    def _firewalls(self, method, project, body, path, name):
        if method == "POST" and name is None:
            self._checked("compute.firewalls.insert", "Firewall", body)
        return self._collection(self.firewalls, "firewalls", method, project, body, path, name)

    def _region(self, method, project, body, path, region):
        if method != "GET":
            raise ApiError(405, "badRequest", f"{method} not allowed here")
        return {"kind": "compute#region", "name": region, "status": "UP",
                "selfLink": f"{API}/projects/{project}/regions/{region}",
                "quotas": self._quotas(REGION_METRICS, self._usage(region))}

    def _project(self, method, project):
        if method != "GET":
            raise ApiError(405, "badRequest", f"{method} not allowed here")
        return {"kind": "compute#project", "name": project, "id": "4242",
                "selfLink": f"{API}/projects/{project}", "quotas": self._quotas(PROJECT_METRICS, self._usage(None))}

    def _quotas(self, metrics, usage):
        return [{"metric": metric, "limit": self.limit(metric), "usage": usage.get(metric, 0.0)} for metric in metrics]

    def limit(self, metric):
        return self.quotas.get(metric, DEFAULT_LIMITS.get(metric, PLENTY))

    # ------------------------------------------------------------ VMs

    def _counted(self, properties):
        """{metric: amount} one VM of these properties takes."""
        machine_type = properties["machineType"].rpartition("/")[2]
        spot = properties.get("scheduling", {}).get("provisioningModel") == "SPOT"
        cpus = ["CPUS_ALL_REGIONS"] + (["PREEMPTIBLE_CPUS"] if spot and self.limit("PREEMPTIBLE_CPUS") > 0 else
                                       ["CPUS", CPU_METRIC.get(machine_family(machine_type))])
        counted = {metric: vcpus(machine_type) for metric in cpus if metric}
        if any(interface.get("accessConfigs") for interface in properties.get("networkInterfaces", [])):
            counted["IN_USE_ADDRESSES"] = 1
        return counted

    def _usage(self, region):
        """What the region's VMs and groups (None: the project's, everywhere) use of each metric."""
        usage = {"INSTANCE_TEMPLATES": float(len(self.templates)),
                 "INSTANCE_GROUP_MANAGERS": float(sum(region in (None, region_of(group["zone"]))
                                                      for group in self.groups.values()))}
        for record in self.instances.values():
            if region is None or region_of(record["_zone"]) == region:
                for metric, amount in self._counted(record).items():
                    usage[metric] = usage.get(metric, 0.0) + amount
        return usage

    def _why_not(self, project, zone, properties):
        """The error (code, message) that keeps a VM of these properties from being created, or None."""
        machine_type = properties["machineType"].rpartition("/")[2]
        if machine_family(machine_type) in self.missing_families.get(zone, ()):
            return ("RESOURCE_NOT_FOUND", f"Invalid value for field 'resource.machineType': 'projects/{project}/"
                                          f"zones/{zone}/machineTypes/{machine_type}'. Machine type with name "
                                          f"'{machine_type}' does not exist in zone '{zone}'.")
        spot = properties.get("scheduling", {}).get("provisioningModel") == "SPOT"
        if zone in self.stockouts or spot and zone in self.spot_stockouts:
            return ("ZONE_RESOURCE_POOL_EXHAUSTED", f"The zone 'projects/{project}/zones/{zone}' does not have enough "
                                                    "resources available to fulfill the request.  Try a different "
                                                    "zone, or try again later.")
        region = region_of(zone)
        usage = {**self._usage(region), "CPUS_ALL_REGIONS": self._usage(None).get("CPUS_ALL_REGIONS", 0.0)}
        for metric, amount in self._counted(properties).items():
            if usage.get(metric, 0.0) + amount > self.limit(metric):
                where = "project" if metric in PROJECT_METRICS else f"region {region}"
                return ("QUOTA_EXCEEDED", f"Quota '{metric}' exceeded.  Limit: {self.limit(metric):.1f} in {where}.")
        return None

    def _later(self, delay, action, *args):
        timer = threading.Timer(delay, self._locked, (action, *args))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _locked(self, action, *args):
        with self._lock:
            action(*args)

    def _start_group(self, name, body):
        body["_project"] = body["instanceTemplate"].split("/")[1]
        body["_members"] = [{"name": f"{body['baseInstanceName']}-{secrets.token_hex(2)}", "id": str(next(self._ids)),
                             "status": None, "errors": []} for _ in range(body["targetSize"])]
        body["_errors"] = []
        self._later(self.vm_delay, self._create_members, name, body)

    def _create_members(self, name, body):
        """The group's engine at work: create each member VM that is not yet, or say why it cannot."""
        if self.groups.get(name) is not body:
            return  # deleted meanwhile
        template = self.templates[body["instanceTemplate"].rpartition("/")[2]]
        properties, zone = template["properties"], body["zone"]
        for member in body["_members"]:
            if member["status"] is not None:
                continue
            problem = self._why_not(body["_project"], zone, properties)
            if problem is None:
                member.update(status="RUNNING", errors=[])
                self.instances[member["name"]] = {**properties, "name": member["name"], "status": "RUNNING",
                                                  "machineType": f"zones/{zone}/machineTypes/{properties['machineType']}",
                                                  "_zone": zone, "_group": name}
                if self.vms:
                    self.vms.start(member["name"], properties["metadata"], _image(properties))
                continue
            code, message = problem
            member["errors"] = [{"code": code, "message": message}]
            instance = f"{API}/projects/{body['_project']}/zones/{zone}/instances/{member['name']}"
            body["_errors"].append({"error": {"code": code, "message": message},
                                    "instanceActionDetails": {"action": "CREATING", "instance": instance},
                                    "timestamp": "2024-01-01T00:00:00.000-00:00"})
        if any(member["status"] is None for member in body["_members"]):
            self._later(self.retry_delay, self._create_members, name, body)

    def _stop_group(self, name, body):
        for member in body["_members"]:
            self._remove_vm(member["name"])

    def _remove_vm(self, name):
        self.instances.pop(name, None)
        if self.vms:
            self.vms.stop(name, power_off=name == self._caller)

    def _start_instance(self, name, body):
        body["_zone"] = body["machineType"].split("/")[-3]
        if self.vms:
            self.vms.start(name, body["metadata"], _image(body))

    def _stop_vm(self, name):
        if self.vms:
            self.vms.stop(name)


def _image(properties):
    return next(disk["initializeParams"]["sourceImage"] for disk in properties["disks"] if disk.get("boot"))


class FakeMetadata(HttpServer):
    """The metadata server of every fake VM: /VM/computeMetadata/v1/instance/..., the default
    service account's access token (`token`) included."""

    def __init__(self, token="a-service-account-token"):
        self.vms, self.token = {}, token

    def url_for(self, vm):
        return f"http://{self.address}/{vm}/computeMetadata/v1"

    def handle(self, handler, method):
        match = re.fullmatch(r"/([^/]+)/computeMetadata/v1/instance/(name|attributes/([^/]+)"
                             r"|service-accounts/default/token)", handler.path)
        if handler.headers.get("Metadata-Flavor") != "Google":
            return self.reply(handler, 403, "Missing Metadata-Flavor:Google header.", "text/plain")
        if not match or match.group(1) not in self.vms:
            return self.reply(handler, 404, "not found", "text/plain")
        vm, what, key = match.groups()
        if what.startswith("service-accounts/"):
            return self.reply(handler, 200, {"access_token": self.token, "expires_in": 3599, "token_type": "Bearer"})
        value = vm if what == "name" else self.vms[vm].get(key)
        if value is None:
            return self.reply(handler, 404, "not found", "text/plain")
        return self.reply(handler, 200, value, "application/text")


class FakeStorage(HttpServer):
    """Cloud Storage's JSON API, for what sdm-peer asks of it: a media upload
    (POST /upload/storage/v1/b/BUCKET/o?uploadType=media&name=OBJECT) and a media download
    (GET /storage/v1/b/BUCKET/o/OBJECT?alt=media) that needs `Authorization: Bearer <token>`
    when `token` is set. `objects`: (bucket, name) -> bytes; `refusal`: an HTTP status every
    upload gets instead."""

    def __init__(self, token=None):
        self.token, self.objects, self.requests, self.refusal = token, {}, [], None

    def handle(self, handler, method):
        path, _, query = handler.path.partition("?")
        query = urllib.parse.parse_qs(query)
        self.requests.append((method, handler.path, handler.headers.get("Authorization")))
        upload = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        download = re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", path)
        if method == "POST" and upload and self.refusal:
            return self.reply(handler, self.refusal, {"error": {"code": self.refusal, "message": "refused on purpose"}})
        if method == "POST" and upload and query.get("uploadType") == ["media"] and query.get("name"):
            data = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            name = (urllib.parse.unquote(upload.group(1)), query["name"][0])
            self.objects[name] = data
            return self.reply(handler, 200, {"kind": "storage#object", "bucket": name[0], "name": name[1],
                                             "size": str(len(data))})
        if method == "GET" and download and query.get("alt") == ["media"]:
            if self.token and handler.headers.get("Authorization") != f"Bearer {self.token}":
                return self.reply(handler, 401, {"error": {"code": 401, "message": "Anonymous caller"}})
            name = tuple(urllib.parse.unquote(part) for part in download.groups())
            if name not in self.objects:
                return self.reply(handler, 404, {"error": {"code": 404, "message": "No such object"}})
            return self.reply(handler, 200, self.objects[name], "application/octet-stream")
        return self.reply(handler, 400, {"error": {"code": 400, "message": f"fake: unsupported {method} {path}"}})


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
    """Fake VMs. A VM whose image runs cloud-init does, from its `user-data` alone, what matters
    to sdm-peer: write_files, then the systemd unit's ExecStart as a local process. A VM of any
    other image boots and does nothing (`idle`), as on Compute Engine. Its calls to the fake
    Compute Engine (`api`: its address) name the VM, so that a VM deleting itself can be ended."""

    def __init__(self, root, metadata, env=None, api=None):
        self.root, self.metadata, self.env, self.api = Path(root), metadata, env or {}, api
        self.idle = []  # VMs whose image ignores user-data
        self.processes = {}  # name -> Popen of the VM's service
        self.started = []  # names in boot order
        self.shutdown_scripts = []  # Popen of every shutdown-script run
        self.reboots = []  # threads booting preempted VMs again
        self.servers = set()  # VMs whose service is the database server
        self.images = {}  # name -> the image it booted

    def start(self, name, metadata, image):
        items = {item["key"]: item["value"] for item in metadata.get("items", [])}
        self.metadata.vms[name] = items
        self.images[name] = image
        if IMAGE.fullmatch(image).group(1) not in CLOUD_INIT_IMAGE_PROJECTS:
            self.idle.append(name)
            return
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
        api = {"SDM_GCE_API_ENDPOINT": f"{self.api}/vm/{name}"} if self.api else {}
        return {**os.environ, **self.env, **api, "SDM_METADATA_URL": self.metadata.url_for(name),
                "NO_GCE_CHECK": "true"}

    def stop(self, name, power_off=False):
        """What a preemption or a deletion does: SIGTERM to the service, the shutdown-script.
        `power_off`: the VM is gone at once (it deleted itself and waits on that in vain)."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL if power_off else signal.SIGTERM)
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
            self.start(name, {"items": [{"key": key, "value": value} for key, value in items.items()]},
                       self.images[name])
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

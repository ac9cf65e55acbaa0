"""The gce provider (DESIGN §6): a config's group is a zonal managed instance group of spot VMs
made from one instance template per config.

This module decides what to create: names, labels, machine types and the request bodies (the
Compute Engine REST JSON), all from the run's settings. api.py talks to Compute Engine;
bootstrap.py and stop.py start and stop a whole run; cloudinit.py renders the VMs' cloud-configs
and metadata.py is what a VM reads back. The managed group re-creates preempted VMs; sdm-peer
never babysits VMs."""

import logging

from ...errors import BadInput, ProviderError, SettingsError
from ..base import Provider, run_zones
from . import cloudinit
from . import metadata as md
from .machine_types import FAMILIES, UnservableShape, custom_machine_type

IMAGE_FAMILIES_HINT = ("an Ubuntu LTS image, e.g. --set image=projects/ubuntu-os-cloud/global/images/family/"
                       "ubuntu-2404-lts-amd64")
# Public image projects whose images do not run cloud-init: their guest agent ignores `user-data`,
# where every VM's set-up lives, so nothing would ever run.
NO_CLOUD_INIT_PROJECTS = {"debian-cloud", "centos-cloud", "rocky-linux-cloud", "rhel-cloud", "rhel-sap-cloud",
                          "suse-cloud", "suse-sap-cloud", "opensuse-cloud", "windows-cloud", "windows-sql-cloud",
                          "almalinux-cloud", "oracle-linux-cloud", "fedora-coreos-cloud"}

log = logging.getLogger("sdm_peer.gce")

REQUIRED = ("project", "zone", "run_name")
DEFAULTS = {
    "network": "default",
    "image": "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",  # runs cloud-init
    "disk_gb": 20,
    "spot": True,
    "service_account": "default",
    "external_ip": True,
    "group_wait_seconds": 600,
}
SERVER_PORT = 7787
DISK_TYPE = "pd-balanced"
DB_MACHINE_TYPE = "e2-small"  # 2 shared vCPUs, 2 GB: the server is one SQLite writer
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]  # access is governed by IAM roles


MACHINE_FAMILIES = tuple(FAMILIES)  # the `machine_family` setting's values


def gce_settings(settings):
    """The run's settings with the gce defaults, refused if a required one is missing."""
    missing = [key for key in REQUIRED if not settings.get(key)]
    if missing:
        raise SettingsError(f"provider gce needs the settings {', '.join(missing)}",
                            hint="--set " + " --set ".join(f"{key}=..." for key in missing))
    full = {**DEFAULTS, **settings}
    full.setdefault("server", f"{internal_dns_name(full, db_vm_name(full))}:{SERVER_PORT}")
    return full


def internal_dns_name(settings, vm):
    """A VM's zonal internal DNS name; a domain-scoped project (example.com:proj) reads
    VM.ZONE.c.proj.example.com.internal."""
    domain, _, project = settings["project"].rpartition(":")
    return f"{vm}.{settings['zone']}.c.{project}{'.' + domain if domain else ''}.internal"


def region(zone):
    return zone.rpartition("-")[0]


def image_project(image):
    """The project an image comes from (None for one of the run's own project)."""
    return image.split("/")[1] if image.startswith("projects/") else None


def check_run(settings, shapes):
    """Refuse, before anything is written, a gce run that could not be provisioned: missing
    settings, an image that cannot run cloud-init, or a config shape no machine family serves
    (with the reason)."""
    settings = gce_settings(settings)
    elsewhere = [zone for zone in settings.get("zones", []) if region(zone) != region(settings["zone"])]
    if elsewhere:
        raise BadInput(f"zones {', '.join(elsewhere)} are not in the region of zone {settings['zone']} "
                       f"({region(settings['zone'])}): a group moves only within its region (its subnetwork, "
                       "quotas and the database VM's network are the region's)",
                       hint=f"list zones of {region(settings['zone'])} only")
    if image_project(settings["image"]) in NO_CLOUD_INIT_PROJECTS:
        raise BadInput(f"image {settings['image']} does not run cloud-init, which sets up every VM of the run "
                       "(from its user-data)", hint=f"choose an image that runs cloud-init: {IMAGE_FAMILIES_HINT}")
    refused = []
    for cores, memory_gb in sorted(set(shapes)):
        try:
            custom_machine_type(cores, memory_gb, settings.get("machine_family"))
        except UnservableShape as exc:
            refused.append(str(exc))
    if refused:
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        family = f" in family {settings['machine_family']}" if settings.get("machine_family") else ""
        raise BadInput(f"{len(refused)} config shape(s) cannot be served{family} on Compute Engine: "
                       + " | ".join(refused[:3]) + more,
                       hint="change those rows' cores/memory_gb in the plan, or the machine_family setting")


# ---------------------------------------------------------------- names

def slug(text):
    """A config name as part of a resource name or label value: c2-m3.75 -> c2-m3p75."""
    return "".join(ch if ch.isalnum() or ch == "-" else "p" if ch == "." else "-" for ch in text.lower())


def run_prefix(settings):
    """What the names of the run's resources start with."""
    return f"sdm-{settings['run_name']}-"


def group_name(settings, config):
    """The name of a config's instance template and of its managed instance group."""
    return run_prefix(settings) + slug(config)


def db_vm_name(settings):
    return f"sdm-{settings['run_name']}-db"


def worker_tag(settings):
    return f"sdm-{settings['run_name']}-worker"


def firewall_name(settings):
    return f"sdm-{settings['run_name']}-workers-to-db"


def server_port(settings):
    return int(settings["server"].rpartition(":")[2])


def _network(settings):
    network = settings["network"]
    return network if "/" in network else f"global/networks/{network}"


def _labels(settings, config=None):
    labels = {"sdm-run": settings["run_name"]}
    if config:
        labels["sdm-config"] = slug(config)
    return labels


def _metadata(items):
    return {"items": [{"key": key, "value": str(value)} for key, value in items.items()]}


def _boot_disk(settings, *, single_instance):
    # A single instance takes the disk type as a zonal URL; an instance template only as a name.
    disk_type = f"zones/{settings['zone']}/diskTypes/{DISK_TYPE}" if single_instance else DISK_TYPE
    return {"boot": True, "autoDelete": True, "type": "PERSISTENT",
            "initializeParams": {"sourceImage": settings["image"], "diskSizeGb": settings["disk_gb"],
                                 "diskType": disk_type}}


def _network_interface(settings):
    interface = {"network": _network(settings)}
    if settings.get("subnetwork"):  # a custom-mode network needs it
        subnetwork = settings["subnetwork"]
        interface["subnetwork"] = (subnetwork if "/" in subnetwork
                                   else f"regions/{region(settings['zone'])}/subnetworks/{subnetwork}")
    if settings["external_ip"]:
        # An external address lets a VM reach the package index and the code's git host; without
        # one (external_ip=false) the network needs Cloud NAT for that.
        interface["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
    return interface


def _scheduling(settings):
    if settings["spot"]:
        # A spot VM that is preempted is deleted; the managed group creates a fresh one.
        return {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE", "automaticRestart": False,
                "onHostMaintenance": "TERMINATE"}
    return {"provisioningModel": "STANDARD", "automaticRestart": True, "onHostMaintenance": "MIGRATE"}


# ---------------------------------------------------------------- request bodies

def template_body(settings, spec, token):
    name = spec.name
    return {
        "name": group_name(settings, name),
        "description": f"sdm-peer run {settings['run_name']}: workers of config {name}",
        "properties": {
            "machineType": custom_machine_type(spec.cores, spec.memory_gb, settings.get("machine_family")),
            "labels": _labels(settings, name),
            "tags": {"items": [worker_tag(settings)]},
            "scheduling": _scheduling({**settings, "spot": settings["spot"] and not spec.standard}),
            "disks": [_boot_disk(settings, single_instance=False)],
            "networkInterfaces": [_network_interface(settings)],
            "serviceAccounts": [{"email": settings["service_account"], "scopes": SCOPES}],
            "metadata": _metadata({
                "user-data": cloudinit.render_worker(settings),
                "shutdown-script": cloudinit.shutdown_script(),
                md.SERVER_KEY: settings["server"],
                md.TOKEN_KEY: token,
                md.RUN_KEY: settings["run_name"],
                md.CONFIG_KEY: name,
                md.CORES_KEY: spec.cores,
                md.MEMORY_KEY: spec.memory_gb,
            }),
        },
    }


def group_body(settings, spec):
    name = group_name(settings, spec.name)
    return {"name": name, "baseInstanceName": name, "targetSize": spec.group_size,
            "instanceTemplate": f"projects/{settings['project']}/global/instanceTemplates/{name}",
            "description": f"sdm-peer run {settings['run_name']}: workers of config {spec.name}"}


def db_vm_body(settings, token):
    return {
        "name": db_vm_name(settings),
        "description": f"sdm-peer run {settings['run_name']}: the database server",
        "machineType": f"zones/{settings['zone']}/machineTypes/{DB_MACHINE_TYPE}",
        "labels": _labels(settings),
        "tags": {"items": [db_vm_name(settings)]},
        "scheduling": _scheduling({"spot": False}),  # never preempted: it holds the study
        "disks": [_boot_disk(settings, single_instance=True)],
        "networkInterfaces": [_network_interface(settings)],
        "serviceAccounts": [{"email": settings["service_account"], "scopes": SCOPES}],
        "metadata": _metadata({"user-data": cloudinit.render_db(settings, token, server_port(settings))}),
    }


def firewall_body(settings):
    """Workers (by their network tag) may reach the server's port on the database VM; nothing else."""
    return {"name": firewall_name(settings), "network": _network(settings), "direction": "INGRESS",
            "priority": 1000, "sourceTags": [worker_tag(settings)], "targetTags": [db_vm_name(settings)],
            "allowed": [{"IPProtocol": "tcp", "ports": [str(server_port(settings))]}],
            "description": f"sdm-peer run {settings['run_name']}: workers to the database server"}


# ---------------------------------------------------------------- the provider

class GceProvider(Provider):
    bootstrap_flags = ("project", "zone", "bucket", "dry_run")
    stop_flags = ("force", "dry_run")

    def __init__(self, settings, token, api=None):
        """`settings`: the run's; `token`: what workers present to the server; `api`: an
        api.ComputeApi (default: for the run's project and zone, SDM_GCE_API_ENDPOINT honoured)."""
        self.settings = gce_settings(settings)
        self.token = token
        if api is None:
            from .api import ComputeApi

            api = ComputeApi(self.settings["project"], self.settings["zone"])
        self.api = api

    @classmethod
    def for_run(cls, settings, run_dir, token):
        if token is None:
            raise SettingsError("the gce provider needs the run's token")
        return cls(settings, token)

    check_run = staticmethod(check_run)
    # The database VM: an e2-small is billed as half of its 2 shared vCPUs, with 2 GB.
    run_machines = (("e2", 0.5, 2.0),)

    @classmethod
    def billed_as(cls, settings, cores, memory_gb):
        """The family of the shape's custom machine type (n2-custom-4-16384 -> n2, custom-1-... ->
        n1), spot unless the run says otherwise."""
        spot = settings.get("spot", DEFAULTS["spot"])
        try:
            machine_type = custom_machine_type(cores, memory_gb, settings.get("machine_family"))
        except UnservableShape:
            return "n2", spot
        prefix = machine_type.partition("-")[0]
        return ("n1" if prefix == "custom" else prefix), spot

    @classmethod
    def bootstrap_run(cls, run, plan_file, settings, options, *, echo):
        from .bootstrap import bootstrap_run  # it makes groups with this class

        return bootstrap_run(run, plan_file, settings, options, echo=echo)

    @classmethod
    def stop_run(cls, run, settings, options, *, echo):
        from .stop import stop_run  # it deletes groups with this class

        return stop_run(run, options, echo=echo)

    @staticmethod
    def worker_identity():
        return md.worker_identity()

    def create_group(self, spec):
        """The config's template, then its managed instance group of `group_size` VMs; both
        kept if they exist (idempotent). Returns once the group's first VM runs; raises
        GroupCannotRun (one line: why) if the cloud reports it cannot make one, or
        ProviderError if none runs within `group_wait_seconds`."""
        name, zone = group_name(self.settings, spec.name), spec.zone or self.settings["zone"]
        try:
            template = template_body(self.settings, spec, self.token)
        except UnservableShape as exc:  # `init` refuses such shapes; a database edited since may not
            raise ProviderError(f"config {spec.name} cannot be served on Compute Engine: {exc}") from None
        self.api.insert_template(template)
        self.api.insert_group(group_body(self.settings, spec), zone)
        log.info("group %s of config %s: %s VMs asked for in %s", name, spec.name, spec.group_size, zone)
        self.api.wait_for_group(name, self.settings["group_wait_seconds"], zone)
        log.info("group %s of config %s: its first VM runs", name, spec.name)
        return name

    def _zones_of(self, spec):
        """Where the group may be: its zone when known, else every zone of the run."""
        return [spec.zone] if spec.zone else run_zones(self.settings)

    def delete_group(self, spec):
        """The managed group (its VMs go with it), then the template it used; a missing one is
        fine (idempotent). The template can only go once no group uses it. True if the group
        was there."""
        name = group_name(self.settings, spec.name)
        existed = any([self.api.delete_group(name, zone) for zone in self._zones_of(spec)])
        self.api.delete_template(name)
        log.info("group %s of config %s deleted", name, spec.name)
        return existed

    def sweep_templates(self, finished):
        """Delete the templates of the `finished` configs (names) whose group is gone: a worker
        that deletes its own group is itself deleted before it can delete the template. The
        names of the templates deleted."""
        prefix = run_prefix(self.settings)
        groups, templates = self.group_zones(), self.api.template_names(prefix)
        if groups is None:  # a dry run lists nothing
            return []
        swept = [name for name in (group_name(self.settings, config) for config in finished)
                 if name in templates and name not in groups]
        for name in swept:
            self.api.delete_template(name)
            log.info("template %s of a finished config swept", name)
        return swept

    def leave_group(self, spec, worker_id):
        """Shrinking: delete this worker's VM (its instance name is its worker id) through its
        managed group, which lowers the group's target size so the VM is not re-created."""
        name = group_name(self.settings, spec.name)
        for zone in self._zones_of(spec):
            self.api.delete_instances(name, [worker_id], zone)
        log.info("VM %s left group %s", worker_id, name)

    def group_zones(self):
        """{name: zone} of the run's managed groups in every zone of the run; None when not
        known (a dry run lists nothing)."""
        found = {zone: self.api.group_names(run_prefix(self.settings), zone) for zone in run_zones(self.settings)}
        if None in found.values():
            return None
        return {name: zone for zone, names in found.items() for name in names}

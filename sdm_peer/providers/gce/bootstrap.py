"""`sdm-peer bootstrap --provider gce`: start (or resume) a whole run on Compute Engine.

1. build the database locally with `init` (RUNDIR/sdm.db, the token beside it);
2. push it to the replica with Litestream, unless the replica already holds the run (then the
   replica is the truth: the database VM restores it); put a wheel of this sdm-peer beside it,
   which every VM installs (package.py), unless `sdm_peer_spec` names what they install;
3. create the firewall rule (workers' tag -> the server's port, nothing else);
4. create the database VM (a small machine type, the database cloud-config);
5. wait until the server answers, or, from outside the VM's network where its address cannot
   be reached, until its first transaction reaches the replica;
6. provision: the groups of running configs, and the first group (through the server's
   provisioning lease when it can be reached; else directly, idempotently, the first worker's
   claim being the proof its group exists).

Every step is idempotent, so running it again resumes. `--dry-run` prints every Compute Engine
call instead and changes nothing. `--http-port` is refused: the database VM serves no dashboard."""

import tempfile
import time
from pathlib import Path

from ... import replication
from ... import settings as settings_mod
from ...client import Client
from ...errors import BadInput, ProviderError, SdmPeerError, ServerUnavailable, SettingsError
from ...run import Started, init_run, provision_groups, stored_and_planned, stored_settings
from ...rundir import RunDir, parse_address, read_token
from ...states import PROVISIONING, RUNNING, WAITING
from ...store import Store
from ...worker import provisions_of
from .. import gce
from ..base import GroupSpec
from . import package, quotas

BOOT_TIMEOUT = 900.0  # seconds for a new database VM to install sdm-peer and serve
POLL_SECONDS = 2.0
DRY_RUN_RETRY_SECONDS = 10.0  # a dry run gives up reading the quotas soon
OWNER = "bootstrap"


def run_name_for(path):
    """A default run name from the run directory's name, if it makes a valid one."""
    name = "".join(ch if ch.isalnum() else "-" for ch in path.name.lower()).strip("-")[:20].rstrip("-")
    return name if name[:1].isalpha() else None


def bootstrap_run(run, plan_file, settings, options, *, echo=print):
    """`sdm-peer bootstrap --provider gce`: the run's gce settings from the flags, then a dry run,
    or init and bootstrap. Returns run.Started, or None for a dry run."""
    if options.http_port is not None:
        raise BadInput("--http-port is for --provider local (the database VM of a gce run serves no dashboard)")
    flags = {"project": options.project, "zone": options.zone, "lease_seconds": options.lease_seconds}
    settings = run_settings(run.path, {**settings, **settings_mod.validate(
        {key: value for key, value in flags.items() if value is not None})}, options.bucket)
    if options.dry_run:
        dry_run(run, plan_file, settings, echo=echo)
        return None
    from ...plan import read_plan

    settings = fit_quotas(run.db, read_plan(plan_file), settings, echo=echo)
    run.path.mkdir(parents=True, exist_ok=True)
    counts = init_run(run.db, plan_file, settings)
    started = bootstrap(run, echo=echo)
    return Started(counts, "the run is on Compute Engine", f"--replica {started['replica_url']} --watch 30")


def fit_quotas(db, plan, settings, *, echo=print, api=None, retry_seconds=None):
    """The new settings, with max_vcpus from what the region's and the project's quotas leave
    free unless given (or stored); refused (BadInput) when a config's one VM can never fit
    them, before anything is written. `api`: a ComputeApi (default: the run's, retrying a
    refusal for `retry_seconds` when given)."""
    stored, configs = stored_and_planned(db, plan)
    full = gce.gce_settings({**stored, **settings})
    gce.check_run(full, [(cores, memory_gb) for _, cores, memory_gb in configs])  # before asking the cloud
    if api is None:
        from .api import ComputeApi

        retrying = {} if retry_seconds is None else {"retry_seconds": retry_seconds}
        api = ComputeApi(full["project"], full["zone"], **retrying)
    region = full["zone"].rpartition("-")[0]
    fitted = quotas.fit(full, configs, api.quotas(region), gce.GceProvider.billed_as)
    if fitted.refusals:
        more = f" (and {len(fitted.refusals) - 3} more)" if len(fitted.refusals) > 3 else ""
        raise BadInput(f"{len(fitted.refusals)} quota refusal(s): " + " | ".join(fitted.refusals[:3]) + more,
                       hint="raise the quota under IAM & Admin > Quotas, or shrink those rows in the plan")
    for quota in fitted.consulted:
        echo(f"quota {quota.metric} in {quota.where}: {quota.usage:g} of {quota.limit:g} in use")
    if "max_vcpus" in settings or "max_vcpus" in stored:
        return settings
    echo(f"max_vcpus {fitted.max_vcpus}: what the quotas leave free for the groups")
    return {**settings, "max_vcpus": fitted.max_vcpus}


def dry_run(run, plan_file, settings, *, echo=print):
    """Print what bootstrap would do, every Compute Engine call included; write nothing. The
    quotas are read (a read changes nothing) where the credentials allow."""
    from ...plan import read_plan
    from .api import DryRunApi

    plan = read_plan(plan_file)
    try:
        settings = fit_quotas(run.db, plan, settings, echo=echo, retry_seconds=DRY_RUN_RETRY_SECONDS)
    except ProviderError as exc:
        echo(f"could not read the quotas ({exc}): max_vcpus is not set from them")
    full = gce.gce_settings(settings_mod.with_defaults(settings))
    api = DryRunApi(full["project"], full["zone"], echo=echo)
    echo(f"would write the database: {len(plan.experiments):,} experiments in {len(plan.configs):,} configs")
    echo(f"would push it to {full['replica_url']} (unless that replica already holds the run)")
    if not full.get("sdm_peer_spec"):
        echo(f"would put a wheel of this sdm-peer {package.version()} at {package.wheel_url(full)}")
    api.insert_firewall(gce.firewall_body(full))
    api.insert_instance(gce.db_vm_body(full, "<token>"))
    echo(f"would wait until the server at {full['server']} answers")
    provider = gce.GceProvider(full, "<token>", api=api)
    for spec in first_groups(plan, settings):
        echo(f"would start the group of {spec.name}: {spec.group_size} VM(s) of {spec.cores} vCPUs")
        provider.create_group(spec)


def first_groups(plan, settings):
    """The groups bootstrap starts first (as many configs as max_vcpus holds, each made smaller
    to fit), chosen by the store itself: a scratch database of the plan, asked for them."""
    with tempfile.TemporaryDirectory() as directory, Store(Path(directory) / "sdm.db") as store:
        store.import_plan(plan, settings=settings, now=time.time())
        return [GroupSpec.from_provision(provision)
                for provision in provisions_of(store.acquire_provisioning(OWNER, now=time.time()))]


def bootstrap(run, *, echo=print, api=None):
    """Bring a gce run (initialised in `run` by `init`) up; return the run's gce settings."""
    with Store(run.db, create=False) as store:
        settings = gce.gce_settings(store.settings)
    token = read_token(run.token_file)
    if api is None:
        from .api import ComputeApi

        api = ComputeApi(settings["project"], settings["zone"])
    replica = settings["replica_url"]
    if replication.replica_backups(replica):
        echo(f"{replica} already holds this run's database: not pushed (the database VM restores it)")
    else:
        replication.push(run.db, replica)
        echo(f"pushed {run.db} to {replica}")
    if settings.get("sdm_peer_spec"):
        echo(f"the VMs install {settings['sdm_peer_spec']} (sdm_peer_spec)")
    else:
        with tempfile.TemporaryDirectory() as directory:
            echo(f"put sdm-peer {package.version()} for the VMs at {package.publish(settings, directory)}")
    before_boot = _newest_txid(replica)  # a new server's first write goes past it
    api.insert_firewall(gce.firewall_body(settings))
    created = api.insert_instance(gce.db_vm_body(settings, token))
    echo(f"database VM {gce.db_vm_name(settings)} {'created' if created else 'exists'}; server {settings['server']}")
    client = db_server_client(settings, token)
    try:
        reachable = wait_until_serving(client, replica, before_boot, echo=echo) if created else client_answers(client)
        provider = gce.GceProvider(settings, token, api=api)
        if reachable:
            provision_groups(client, provider, owner=OWNER, echo=echo)
        else:
            provision_from_replica(replica, provider, echo=echo)
    finally:
        client.close()
    return settings


def db_server_client(settings, token):
    """A client for the database VM's server, quick to give up: from outside the VM's network
    it cannot be reached."""
    return Client(parse_address(settings["server"]), token, timeout=10.0, retry_seconds=1.0)


def client_answers(client):
    try:
        client.call("status")
        return True
    except ServerUnavailable:
        return False


def _newest_txid(replica):
    return max((int(txid, 16) for txid, _ in replication.replica_backups(replica)), default=None)


def wait_until_serving(client, replica, before_boot, *, echo=print, timeout=BOOT_TIMEOUT):
    """Wait for the new database VM: True once its server answers here, False once the
    replica shows it serving (a transaction past `before_boot`) though we cannot reach it."""
    echo(f"waiting for the database VM to serve (up to {timeout / 60:.0f} minutes)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client_answers(client):
            return True
        if (_newest_txid(replica) or 0) > before_boot:
            echo(f"the server is running (its first change reached {replica}) but cannot be reached from here")
            return False
        time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
    raise SdmPeerError(f"the database VM did not serve within {timeout / 60:.0f} minutes",
                       hint="see its serial console: gcloud compute instances get-serial-port-output VM")


def provision_from_replica(replica, provider, *, echo=print):
    """Without a reachable server: the run's state from its replica; every running or
    provisioning config's group made sure of, or else the first waiting config's created."""
    configs = replication.status_from_replica(replica)["configs"]
    wanted = [config for config in configs if config["state"] in (RUNNING, PROVISIONING)]
    if not wanted:
        wanted = [config for config in configs if config["state"] == WAITING][:1]
    for config in wanted:
        provider.create_group(GroupSpec.from_config(config))
        echo(f"made sure the group of {config['name']} exists")


def run_settings(run_path, settings, bucket=None):
    """The settings a gce bootstrap stores: run_name defaults to the run directory's name and
    replica_url to gs://BUCKET/RUN_NAME; those already stored in RUNDIR/sdm.db count."""
    stored = stored_settings(RunDir(run_path))
    settings = dict(settings)
    run_name = settings.get("run_name") or stored.get("run_name") or run_name_for(run_path)
    if run_name and not stored.get("run_name"):
        settings.setdefault("run_name", run_name)
    if bucket:
        settings.setdefault("replica_url", f"gs://{bucket}/{run_name or 'sdm-peer'}")
    if not (settings.get("replica_url") or stored.get("replica_url")):
        raise SettingsError("a gce run needs --bucket (or --set replica_url=gs://BUCKET/PATH)",
                            hint="the database VM restores the run from that replica")
    return settings_mod.validate(settings)

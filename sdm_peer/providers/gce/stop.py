"""`sdm-peer stop --dir RUNDIR` for a gce run: take the run off Compute Engine, keeping its results.

1. delete every config's managed group and template (a missing one is fine); the workers give
   their leases back as their VMs stop;
2. before the database VM goes, confirm that the run's Litestream replica holds every result:
   - where the server can be reached, the replica (restored) must count as many experiments of
     each status in each config as the server reports; it is given a while to catch up;
   - where it cannot (from outside the VM's network), the replica must show every experiment
     finished: a replica is a prefix of the database's history, so then no outcome is missing;
   not confirmed: refuse, keeping the database VM and the firewall rule (`--force` skips the
   check); a database VM already gone leaves nothing to confirm;
3. delete the database VM, then the firewall rule, and say where the results are.

`--dry-run` prints every Compute Engine call instead and changes nothing."""

import time
from collections import Counter

from ... import replication
from ...errors import SdmPeerError, ServerUnavailable
from ...overview import finished
from ...rundir import read_token
from ...states import COUNT_FIELDS
from ...store import Store
from .. import gce
from ..base import GroupSpec
from .bootstrap import client_answers, db_server_client

REPLICA_WAIT = 120.0  # seconds the replica is given to catch up with the server
POLL_SECONDS = 2.0
DIFFERENCES_SHOWN = 3


class ResultsNotConfirmed(SdmPeerError):
    """The replica could not be shown to hold every result: the database VM is kept."""


def stop_run(run, options, *, echo=print):
    """`sdm-peer stop` of a gce run (`--dry-run`: only say what it would do); what to say after
    the run directory, or None."""
    if options.dry_run:
        dry_run(run, echo=echo)
        return None
    stop(run, force=options.force, echo=echo)
    return "stopped; nothing of it is left on Compute Engine"


def stop(run, *, force=False, echo=print, api=None):
    """Tear a gce run down (groups, then, once its results are safe, the database VM and the
    firewall rule); return the run's gce settings."""
    settings, configs = stored_run(run)
    if api is None:
        from .api import ComputeApi

        api = ComputeApi(settings["project"], settings["zone"])
    for name in delete_groups(settings, configs, api):
        echo(f"removed the group of {name}")
    vm = gce.db_vm_name(settings)
    if not api.instance_exists(vm):
        echo(f"the database VM {vm} is already gone: nothing to confirm")
    elif force:
        echo("--force: not confirming that the replica holds every result")
    else:
        confirm_results_safe(settings, read_token(run.token_file), echo=echo)
    for kind, name, deleted in delete_database_vm(settings, api):
        echo(f"{kind} {name} {'deleted' if deleted else 'was already gone'}")
    replica = settings.get("replica_url")
    if replica:
        echo(f"the results are in {replica}; fetch them with: sdm-peer restore --replica {replica} --out results.db")
    return settings


def dry_run(run, *, echo=print):
    """Print every Compute Engine call `stop` would make; change nothing, contact nothing."""
    from .api import DryRunApi

    settings, configs = stored_run(run)
    api = DryRunApi(settings["project"], settings["zone"], echo=echo)
    delete_groups(settings, configs, api)
    echo(f"would confirm that {settings.get('replica_url')} holds every result of the server at {settings['server']}")
    delete_database_vm(settings, api)


def stored_run(run):
    """The run's gce settings and its configs' names, from RUNDIR/sdm.db (every config the run
    was given: the database VM's copy cannot have more; the zones of their groups are listed,
    as that copy's may be older)."""
    with Store(run.db, readonly=True) as store:
        return gce.gce_settings(store.settings), [config["name"] for config in store.status(now=time.time())["configs"]]


def delete_groups(settings, configs, api):
    """Every config's managed group and template that exists (two listings, then a deletion for
    each one found: a study of thousands of configs has few left); the names of the configs whose
    group was there. Only the run's own names are deleted, whatever else shares their prefix."""
    provider = gce.GceProvider(settings, None, api=api)  # deleting needs no token
    groups, templates = provider.group_zones(), api.template_names(gce.run_prefix(settings))
    removed = []
    for config in configs:
        name = gce.group_name(settings, config)
        if groups is None or name in groups:  # None: not listed (a dry run), so by name in every zone
            if provider.delete_group(GroupSpec(config, zone=groups and groups[name])):
                removed.append(config)
        elif name in templates:  # left behind by a worker stopped between its group and its template
            api.delete_template(name)
    return removed


def delete_database_vm(settings, api):
    """The database VM, then the firewall rule that let the workers reach it: (kind, name,
    deleted) of each, deleted False where it was already gone."""
    vm, rule = gce.db_vm_name(settings), gce.firewall_name(settings)
    return [("database VM", vm, api.delete_instance(vm)), ("firewall rule", rule, api.delete_firewall(rule))]


# ---------------------------------------------------------------- are the results safe?

def confirm_results_safe(settings, token, *, echo=print):
    """Return once the replica is known to hold every result; else raise ResultsNotConfirmed."""
    if not settings.get("replica_url"):
        raise not_confirmed(settings, "the run has no replica_url setting: its results are only on the database VM")
    client = db_server_client(settings, token)
    try:
        if client_answers(client):
            wait_until_replica_agrees(client, settings, echo=echo)
        else:
            confirm_finished_in_replica(settings, echo=echo)
    finally:
        client.close()


def wait_until_replica_agrees(client, settings, *, echo=print):
    """Restore the replica until its counts per config and status are the server's, for up to
    REPLICA_WAIT seconds."""
    replica = settings["replica_url"]
    echo(f"confirming that {replica} holds what the server reports (up to {REPLICA_WAIT:.0f}s)")
    deadline = time.monotonic() + REPLICA_WAIT
    while True:
        try:
            difference = replica_difference(replica, client.call("status"))
        except ServerUnavailable as exc:
            raise not_confirmed(settings, str(exc)) from None
        if difference is None:
            echo(f"{replica} holds every experiment's status the server reports")
            return
        if time.monotonic() >= deadline:
            raise not_confirmed(settings, f"after {REPLICA_WAIT:.0f}s, {difference}")
        time.sleep(POLL_SECONDS)


def confirm_finished_in_replica(settings, *, echo=print):
    """Without the server: confirmed if the replica shows every experiment finished."""
    replica, server = settings["replica_url"], settings["server"]
    unreachable = f"the server at {server} cannot be reached from here"
    try:
        totals = replication.status_from_replica(replica)["totals"]
    except replication.ReplicationError as exc:
        raise not_confirmed(settings, f"{unreachable}, and {exc}") from None
    unfinished = totals["total"] - finished(totals)
    if unfinished:
        raise not_confirmed(settings, f"{unreachable}, and the replica shows {unfinished:,} of "
                                      f"{totals['total']:,} experiments unfinished")
    echo(f"{unreachable}; {replica} shows all {totals['total']:,} experiments finished")


def replica_difference(replica, server_status):
    """None if the replica restores to the server's counts per config and status; else what differs."""
    try:
        restored = replication.status_from_replica(replica)
    except replication.ReplicationError as exc:
        return str(exc)
    on_server, in_replica = status_counts(server_status), status_counts(restored)
    differences = [f"{config} {field}: {on_server[config, field]} on the server, "
                   f"{in_replica[config, field]} in the replica"
                   for config, field in sorted(on_server.keys() | in_replica.keys())
                   if on_server[config, field] != in_replica[config, field]]
    if not differences:
        return None
    more = len(differences) - DIFFERENCES_SHOWN
    return "it differs from the server: " + "; ".join(differences[:DIFFERENCES_SHOWN]) + (
        f" (and {more} more)" if more > 0 else "")


def status_counts(status):
    """{(config name, status field): experiments} of a status object; 0 for a config it lacks."""
    return Counter({(config["name"], field): config[field] for config in status["configs"]
                    for field in COUNT_FIELDS.values()})


def not_confirmed(settings, reason):
    return ResultsNotConfirmed(
        f"cannot confirm that {settings.get('replica_url') or 'a replica'} holds every result ({reason}); kept "
        f"the database VM {gce.db_vm_name(settings)} and the firewall rule {gce.firewall_name(settings)} "
        "(the groups are removed)",
        hint="run the same `sdm-peer stop` again later or from where the server can be reached; "
             "add --force to delete them anyway")

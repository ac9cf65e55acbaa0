"""The command line (DESIGN §5): a thin shell that parses, calls one library function, formats."""

import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import click

from . import settings as settings_mod
from .errors import BadInput, SdmPeerError
from .providers import base as providers
from .rundir import RunDir


class Cli(click.Group):
    """Turns SdmPeerError into one line on stderr (with a hint) and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SdmPeerError as exc:
            click.echo(f"Error: {exc}", err=True)
            if exc.hint:
                click.echo(f"Try: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdm-peer")
def main():
    """sdm-peer: run a grid of experiments on preemptible workers with leases, no master daemon."""


def now():
    return time.time()


def options(*decorators):
    """Several click options as one decorator, in the order given."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


def db_option(help="The database file."):
    return click.option("--db", type=click.Path(dir_okay=False), help=help)


def dir_option(help="A run directory.", **settings):
    return click.option("--dir", "run_dir", **{"type": click.Path(file_okay=False), "help": help, **settings})


def server_option(help="The server, HOST:PORT."):
    return click.option("--server", help=help)


def token_file_option(help="Token file (or set SDM_TOKEN)."):
    return click.option("--token-file", type=click.Path(dir_okay=False), help=help)


tls_ca_option = click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), envvar="SDM_TLS_CA",
                             help="Talk TLS to the server, trusting this CA certificate (or set SDM_TLS_CA).")

# --db DB | --server HOST:PORT | --dir RUNDIR, and --token-file, for commands that read a run.
target_options = options(db_option("Read the database file directly."), server_option("Ask a running server, HOST:PORT."),
                         dir_option(), token_file_option(), tls_ca_option)
# --server HOST:PORT | --dir RUNDIR, for commands that talk to the run's server.
server_options = options(server_option(), dir_option("A run directory instead of --server."), token_file_option(),
                         tls_ca_option)
# --db DB | --dir RUNDIR, for commands that read the database file.
database_options = options(db_option(), dir_option())


def exactly_one(*flags):
    """Refuse unless exactly one of the (flag, value) pairs has a value."""
    if len([flag for flag, value in flags if value]) != 1:
        names = [flag for flag, _ in flags]
        raise BadInput(f"give exactly one of {', '.join(names[:-1])} or {names[-1]}")


def database_path(db, run_dir):
    return RunDir(run_dir).db if run_dir else Path(db)


def settings_options(command):
    """--set KEY=VALUE (repeatable) and --settings FILE, shared by init and bootstrap."""
    command = click.option("--settings", "settings_file", type=click.Path(dir_okay=False),
                           help="Run settings from a JSON or TOML file.")(command)
    command = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                           help="A run setting (repeatable), e.g. --set provider=local.")(command)
    return command


def collect_settings(assignments, settings_file, **flags):
    """Settings from --settings, then --set, then explicit flags; validated before any write."""
    collected = settings_mod.read_file(settings_file) if settings_file else {}
    collected.update(settings_mod.parse_assignments(assignments))
    collected.update({key: value for key, value in flags.items() if value is not None})
    return settings_mod.validate(collected)


@main.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_file", required=True, type=click.Path(), help="CSV, JSON or JSONL plan file.")
@click.option("--group-size", type=int, help="Workers per group for configs whose plan rows give none.")
@click.option("--max-failures", type=int, help="Non-zero exits before an experiment is FAILED (default 3).")
@click.option("--max-interruptions", type=int,
              help="Releases/expiries before an experiment is FAILED (default 10).")
@token_file_option("Where to write the token (default DB.token).")
@settings_options
def init(db, plan_file, group_size, max_failures, max_interruptions, token_file, assignments, settings_file):
    """Create DB from a plan, or add the plan's new experiments to it.

    Re-running with the same plan adds nothing and changes nothing; a bad plan changes nothing."""
    from .run import init_run

    settings = collect_settings(assignments, settings_file, group_size=group_size, max_failures=max_failures,
                                max_interruptions=max_interruptions)
    counts = init_run(db, plan_file, settings, token_file)
    click.echo(f"{db}: {counts['experiments_added']:,} experiments added in {counts['configs_added']:,} new configs"
               + (f"; {counts['configs_reopened']} DONE configs reopened" if counts["configs_reopened"] else ""))


@contextlib.contextmanager
def status_source(db, server, run_dir, token_file, replica=None, tls_ca=None):
    """A function returning the run's status object, from whichever target was given; what it
    opened is closed on leaving."""
    exactly_one(("--db", db), ("--server", server), ("--dir", run_dir), ("--replica", replica))
    if replica:
        from .replication import status_from_replica

        yield lambda: status_from_replica(replica)
    elif server:
        from .client import Client

        with contextlib.closing(Client.for_server(server, token_file=token_file, tls_ca=tls_ca)) as client:
            yield functools.partial(client.call, "status")
    else:
        from .overview import overview
        from .store import Store

        with Store(database_path(db, run_dir), create=False) as store:
            yield lambda: overview(store, now=now())


@main.command()
@target_options
@click.option("--replica", metavar="URL", help="Read a read-only status straight from a replica.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (DESIGN §5).")
@click.option("--watch", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
@click.option("--all", "show_all", is_flag=True, help="Show every config, even in a long run.")
def status(db, server, run_dir, token_file, tls_ca, replica, as_json, watch, show_all):
    """Where the run stands: per config, how many experiments are done, running, waiting, failed;
    the leases held and by whom, recent hand-offs, failures and expiries, throughput and an ETA.

    With replication on, also how long ago the replica last received a change."""
    from .view import status_view, watch as watch_status

    with status_source(db, server, run_dir, token_file, replica, tls_ca) as read:
        if as_json:
            try:
                while True:
                    click.echo(json.dumps(read()))
                    if not watch:
                        return
                    time.sleep(watch)
            except KeyboardInterrupt:  # Ctrl-C ends a watch; it is not an error
                return
        if watch:
            watch_status(read, watch, show_all=show_all)
        else:
            from rich.console import Console

            Console().print(status_view(read(), show_all=show_all))


@main.command()
@database_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file, .csv or .jsonl.")
def export(db, run_dir, out):
    """Write every experiment, params and results flattened into columns, to a CSV or JSONL file."""
    from .export import export as write_export
    from .store import Store

    exactly_one(("--db", db), ("--dir", run_dir))
    if not Path(out).parent.is_dir():
        raise BadInput(f"{out}: no such directory {str(Path(out).parent)!r}")
    with Store(database_path(db, run_dir), create=False) as store:
        count = write_export(store, out)
    click.echo(f"{out}: {count:,} experiments")


@main.command()
@database_options
@click.option("--out", required=True, type=click.Path(),
              help="Directory for report.html and its plots (made if missing).")
@click.option("--by", "by", multiple=True, metavar="PARAM",
              help="Plot and fit each value of this parameter separately (repeatable: each combination).")
def report(db, run_dir, out, by):
    """The study's answer: OUT/report.html with PNG plots of wall time (and of the results'
    `*_seconds` fields) against cores and memory and as a cores × memory heatmap, a table per
    shape (n, mean, median, p95), a fitted scaling curve time = a · cores^b · (1 + c/memory),
    where the attempts ran, and the attempt history (failures, preemptions, compute lost to
    re-runs). Reads only."""
    from .report import write_report
    from .store import Store

    exactly_one(("--db", db), ("--dir", run_dir))
    with Store(database_path(db, run_dir), readonly=True) as store:
        written = write_report(store, out, by=by)
    click.echo(f"{written['path']}: {written['results']:,} results, {len(written['plots'])} plots"
               + ("" if written["results"] else " (no results yet)"))


@main.command()
@click.option("--replica", required=True, metavar="URL", help="gs://BUCKET/PATH or file:///PATH.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the database.")
@click.option("--force", is_flag=True, help="Replace an existing database at --out.")
def restore(replica, out, force):
    """Restore a run's database from its Litestream replica.

    A missing, empty or corrupted replica is an error; the restored file is checked before it
    is put in place."""
    from .replication import restore as restore_database

    restore_database(replica, out, force=force)
    click.echo(f"{out}: restored from {replica}")


def setup_logging(verbose=False):
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@db_option()
@dir_option("A run directory: serves RUNDIR/sdm.db and records server.json.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7787, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 takes a free one.")
@token_file_option("Token file (default DB.token).")
@click.option("--lease-seconds", type=click.FloatRange(min=0.1),
              help="Lease period (default: the run's lease_seconds setting, 60).")
@click.option("--idle-timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds before an idle connection is closed.")
@click.option("--max-connections", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Connections served at once; more are refused with BUSY.")
@click.option("--replicate", is_flag=True,
              help="Run under `litestream replicate` (a missing database is restored from the replica first).")
@click.option("--replica", metavar="URL", help="Replica URL for --replicate (default $SDM_REPLICA_URL).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="Serve TLS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="The certificate's private key (PEM).")
@click.option("--durable", is_flag=True,
              help="synchronous=FULL: every acknowledged report survives a power cut (group commit keeps it fast).")
@click.option("--http-port", type=click.IntRange(0, 65535),
              help="Also serve a read-only web dashboard on this port (0 takes a free one).")
@click.option("--http-host", default="127.0.0.1", show_default=True, help="Address the dashboard listens on.")
def serve(**options):
    """Serve a run's database to workers over TCP (newline-delimited JSON).

    Prints `listening on HOST:PORT` once it accepts connections. SIGTERM or SIGINT stops it
    after answering the requests in flight. With --replicate, Litestream ships every change
    to the replica (gs://BUCKET/PATH or file:///PATH) and the server dies with it. With
    --http-port, the same process serves a read-only web dashboard (token: Bearer header, or
    the read-only token in DB.view-token given once as /?token=)."""
    from .run import ServeOptions, serve as serve_run

    exactly_one(("--db", options["db"]), ("--dir", options["run_dir"]))
    if bool(options["tls_cert"]) != bool(options["tls_key"]):
        raise BadInput("give both --tls-cert and --tls-key, or neither")
    setup_logging()
    serve_run(ServeOptions(**options))


def run_token(run_dir, token_file):
    """The token a worker presents, found as its client finds it (the gce provider hands it on)."""
    from .rundir import resolve_token

    return resolve_token(token_file, default_path=RunDir(run_dir).token_file if run_dir else None)


def metadata_client(tls_ca, **options):
    """On a VM its provider made: what the provider put in its metadata, and a client for its server."""
    from .client import Client
    from .rundir import parse_address

    vm = providers.worker_identity()
    return vm, Client(parse_address(vm["server"]), vm["token"], tls_ca=tls_ca, **options)


def server_client(server, run_dir, token_file, **options):
    """A client for --server HOST:PORT or --dir RUNDIR."""
    from .client import Client

    exactly_one(("--server", server), ("--dir", run_dir))
    if server:
        return Client.for_server(server, token_file=token_file, **options)
    return Client.for_run_dir(RunDir(run_dir), token_file=token_file, **options)


@main.command(context_settings={"ignore_unknown_options": True})
@server_options
@click.option("--cores", type=click.IntRange(min=1), help="This worker's cores (default: the machine's).")
@click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True),
              help="This worker's memory in GB (default: the machine's, rounded).")
@click.option("--worker-id", help="A name for this worker (default HOSTNAME:PID).")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Where attempts' working directories go (default RUNDIR/work or ./sdm-work).")
@click.option("--from-metadata", is_flag=True,
              help="On a Compute Engine VM: server, token, shape, worker id and group from the metadata server.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def work(server, run_dir, token_file, tls_ca, cores, memory_gb, worker_id, work_dir, from_metadata, command):
    """Claim and run experiments of this worker's shape until its config is finished.

    COMMAND (after `--`) runs once per experiment, without a shell, in a fresh working
    directory, with SDM_EXPERIMENT_KEY, SDM_PARAMS, SDM_PARAMS_FILE, SDM_RESULT_FILE,
    SDM_ATTEMPT and SDM_WORKDIR set. Without COMMAND, the run's `command` setting is used.
    Exit 0 means the config is finished; SIGTERM gives the running experiment back."""
    import os

    from .worker import Worker, default_worker_id, machine_shape

    if (cores is None) != (memory_gb is None):
        raise BadInput("give both --cores and --memory-gb, or neither")
    own_group, vm_facts = os.environ.get("SDM_GROUP"), None
    if from_metadata:
        vm, client = metadata_client(tls_ca, retry_seconds=None)
        cores, memory_gb, worker_id, own_group, token = (vm["cores"], vm["memory_gb"], vm["worker_id"], vm["config"],
                                                         vm["token"])
        vm_facts = {"cpu_platform": vm.get("cpu_platform")}
    else:
        client = server_client(server, run_dir, token_file, retry_seconds=None, tls_ca=tls_ca)
        token = run_token(run_dir, token_file)
    if cores is None:
        cores, memory_gb = machine_shape()
    run_root = run_dir or os.environ.get("SDM_RUN_DIR")
    setup_logging()
    worker = Worker(client, list(command) or None, worker_id=worker_id or default_worker_id(), cores=cores,
                    memory_gb=memory_gb, work_root=work_dir or (Path(run_root) / "work" if run_root else "sdm-work"),
                    provider_for=lambda settings: providers.provider_for(settings, run_root, token=token),
                    own_group=own_group, vm_facts=vm_facts)
    with contextlib.closing(client):
        status = worker.run()
    sys.exit(status)


class RegisteredProvider(click.Choice):
    """--provider's choices: the providers registered when the command runs."""

    def __init__(self):
        super().__init__(())

    choices = property(lambda self: providers.names(), lambda self, value: None)


@main.command()
@click.option("--plan", "plan_file", required=True, type=click.Path(), help="CSV, JSON or JSONL plan file.")
@click.option("--provider", required=True, type=RegisteredProvider(), help="Where groups come from.")
@dir_option("The run directory.", required=True)
@click.option("--lease-seconds", type=click.FloatRange(min=0.1), help="Lease period for the server.")
@click.option("--project", help="gce: the Google Cloud project.")
@click.option("--zone", help="gce: the zone of every VM, e.g. us-central1-a.")
@click.option("--bucket", help="gce: the Cloud Storage bucket of the database's replica (gs://BUCKET/RUN_NAME).")
@click.option("--dry-run", is_flag=True, help="gce: print every Compute Engine call it would make; change nothing.")
@click.option("--http-port", type=click.IntRange(0, 65535),
              help="local: the server also serves its read-only web dashboard on this port.")
@settings_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def bootstrap(plan_file, provider, run_dir, lease_seconds, project, zone, bucket, dry_run, http_port, assignments,
              settings_file, command):
    """Start a whole run: init RUNDIR/sdm.db, start the server, provision the first group.

    With --provider gce: push the database to the replica, create the firewall rule and the
    database VM, wait for its server, provision the first group of spot VMs.

    Safe to repeat: on a live run it changes nothing harmful, on a run whose server died it
    restarts it, and it finishes a provisioning whose lease lapsed."""
    from .run import bootstrap_run

    run = RunDir(run_dir)
    settings = collect_settings(assignments, settings_file, provider=provider, command=list(command))
    options = providers.RunOptions(lease_seconds=lease_seconds, http_port=http_port, project=project, zone=zone,
                                   bucket=bucket, dry_run=dry_run)
    started = bootstrap_run(run, plan_file, settings, options, echo=click.echo)
    if started is not None:
        click.echo(f"{run.path}: {started.counts['experiments_added']:,} experiments added; {started.where}")
        click.echo(f"watch it with: sdm-peer status {started.watch}")
        for note in started.notes:
            click.echo(note)


@main.command()
@server_options
@click.option("--worker-id", help="The worker whose leases to give back.")
@click.option("--reason", default="released by hand", show_default=True, help="Recorded with each attempt.")
@click.option("--from-metadata", is_flag=True,
              help="On a Compute Engine VM: this VM's worker id, server and token from the metadata server.")
def release(server, run_dir, token_file, tls_ca, worker_id, reason, from_metadata):
    """Give back every lease a worker holds (its experiments become INTERRUPTED).

    This is what a VM's shutdown script runs when the VM is preempted."""
    if from_metadata:
        vm, client = metadata_client(tls_ca, retry_seconds=15.0)
        worker_id = vm["worker_id"]
    elif worker_id is None:
        raise BadInput("give --worker-id (or --from-metadata on a VM)")
    else:
        client = server_client(server, run_dir, token_file, retry_seconds=15.0, tls_ca=tls_ca)
    with contextlib.closing(client):
        released = client.call("release", worker_id=worker_id, reason=reason)["released"]
    click.echo(f"released {released} lease(s) of {worker_id}")


@main.group()
def group():
    """Create or remove one config's group of workers, with the run's provider settings.

    For operators: bring a group up after raising a quota, or down by hand. Both are
    idempotent: an existing group is kept, a missing one is fine."""


@contextlib.contextmanager
def group_provider(config, db, server, run_dir, token_file, tls_ca):
    """The run's provider and CONFIG's spec, from the database or the server."""
    from .run import group_provider as provider_and_spec

    exactly_one(("--db", db), ("--server", server), ("--dir", run_dir))
    if server:
        with contextlib.closing(server_client(server, None, token_file, tls_ca=tls_ca)) as client:
            yield provider_and_spec(config, client=client, token_file=token_file)
    else:
        yield provider_and_spec(config, db_path=database_path(db, run_dir), token_file=token_file)


@group.command("up")
@click.argument("config")
@target_options
def group_up(config, db, server, run_dir, token_file, tls_ca):
    """Create CONFIG's group (e.g. c4-m16) of group_size workers."""
    with group_provider(config, db, server, run_dir, token_file, tls_ca) as (provider, spec):
        provider.create_group(spec)
    click.echo(f"group of {config} is up ({spec.group_size} workers)")


@group.command("down")
@click.argument("config")
@target_options
def group_down(config, db, server, run_dir, token_file, tls_ca):
    """Remove CONFIG's group; its workers give their leases back as they stop."""
    with group_provider(config, db, server, run_dir, token_file, tls_ca) as (provider, spec):
        provider.delete_group(spec)
    click.echo(f"group of {config} is down")


@main.command()
@dir_option("The run directory.", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--force", is_flag=True,
              help="gce: delete the database VM even when its replica cannot be confirmed to hold every result.")
@click.option("--dry-run", is_flag=True, help="gce: print every Compute Engine call it would make; change nothing.")
def stop(run_dir, force, dry_run):
    """Stop a run: remove every group (its workers give their leases back), then the server.

    A gce run: then, once its Litestream replica is confirmed to hold every result (it agrees
    with the server, or shows every experiment finished), delete the database VM and the
    firewall rule, and say where the results are. Not confirmed: both are kept, exit 1."""
    from .run import stop as stop_run

    said = stop_run(RunDir(run_dir), providers.RunOptions(force=force, dry_run=dry_run), echo=click.echo)
    if said is not None:
        click.echo(f"{run_dir}: {said}")


@main.command()
@dir_option("Where the demo run lives; a previous demo there is replaced.", default="sdm-demo", show_default=True)
@click.option("--lease-seconds", default=10.0, show_default=True, type=click.FloatRange(min=1),
              help="Lease period of the demo run.")
def demo(run_dir, lease_seconds):
    """Run a small real study on this machine with the local provider and show its progress."""
    from .demo import run_demo

    run_demo(RunDir(run_dir), lease_seconds=lease_seconds)


@main.command()
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Fraction of the full study (84,400 experiments over 2,000 configs) to simulate.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of every random draw.")
@click.option("--group-size", default=5, show_default=True, type=click.IntRange(min=1), help="VMs per group.")
@click.option("--preemptions-per-vm-hour", default=0.05, show_default=True, type=click.FloatRange(min=0),
              help="Spot preemption rate of each VM.")
@click.option("--max-vcpus", type=click.IntRange(min=1), default=None,
              help="Also run configs concurrently within this many vCPUs, and show each scenario against the "
                   "quota bound; configs whose one VM needs more are refused up front.")
@click.option("--out", default="simulate.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the results as JSON.")
def simulate(scale, seed, group_size, preemptions_per_vm_hour, max_vcpus, out):
    """Compare, in simulated time through the real store, the replaced master-polling design,
    sdm-peer, and sdm-peer with pre-warming and shrinking (and, with --max-vcpus, configs run
    concurrently): makespan, VM-hours billed, idle VM-hours, cost, re-run hours and person
    interventions."""
    from .simulate import simulate as run_simulation, table, write

    outcome = run_simulation(scale=scale, seed=seed, group_size=group_size,
                             preemptions_per_vm_hour=preemptions_per_vm_hour, max_vcpus=max_vcpus)
    write(outcome, out)
    click.echo(table(outcome))
    click.echo(f"written to {out}")


if __name__ == "__main__":
    sys.exit(main())

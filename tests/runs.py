"""Helpers for end-to-end tests: real servers, workers and groups as processes, all on 127.0.0.1."""

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdm_peer.run import init_run
from sdm_peer.rundir import read_token, token_path_for
from sdm_peer.settings import validate
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
if params.get("touch"):
    open(params["touch"], "w").close()
if params.get("wait_for"):  # a gate the test opens: the experiment runs until the file exists
    deadline = time.monotonic() + 60
    while not os.path.exists(params["wait_for"]):
        if time.monotonic() > deadline:
            sys.exit(f"no {params['wait_for']} within 60 s")
        time.sleep(0.02)
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


START_TIMEOUT = 20.0  # seconds for a server process to print its listening line
STOP_TIMEOUT = 10.0  # seconds for a server process to exit after SIGTERM

def make_run(directory, rows, **settings):
    """A run database (DIR/sdm.db) created the way `sdm-peer init` does; returns (db, token)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "sdm.db"
    init_run(db, plan_file(directory, rows), validate(settings))
    return db, read_token(token_path_for(db))


class ServerProcess:
    """One `python -m sdm_peer serve` child; stdout is read up to its listening line, stderr goes to a file."""

    def __init__(self, argv, log_path):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        self.pid = self.proc.pid
        self.listening_line = self._read_line()
        match = re.fullmatch(r"listening on (\S+):(\d+)", self.listening_line)
        assert match, f"unexpected first line {self.listening_line!r}"
        self.address = (match.group(1), int(match.group(2)))

    def _read_line(self):
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.stop(check=False)
                    pytest.fail(f"the server printed no listening line in {START_TIMEOUT}s:\n{self.log()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.stop(check=False)
                    pytest.fail(f"the server exited before listening:\n{self.log()}")
                buffer += chunk
        return buffer.split(b"\n", 1)[0].decode()

    def stop(self, check=True):
        """SIGTERM and wait; returns the exit code. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            if check:
                raise AssertionError(f"the server did not exit within {STOP_TIMEOUT}s of SIGTERM") from None
            code = self.proc.returncode
        self.proc.stdout.close()
        self._log.close()
        return code

    def log(self):
        return self.log_path.read_text(errors="replace")


def start_server(run, *, port=0, lease_seconds=None):
    """`sdm-peer serve --dir RUN` as a process (its Popen), once it listens."""
    lease = [] if lease_seconds is None else ["--lease-seconds", str(lease_seconds)]
    argv = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port", str(port), *lease]
    return ServerProcess(argv, run.path / "server.log").proc


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

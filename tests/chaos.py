"""Chaos run (issue 6, item 1): a whole study under faults, then its invariants and its figures.

    python -m tests.chaos [--seed N] [--duration SECONDS] [--dir DIR] [--keep] [--json]

The study: CONFIGS configs of different shapes, each of at least 20 experiments, each config's
group up to GROUP_SIZE local workers, as many as MAX_VCPUS (12) holds: 12 of one core, 3 of
four. Configs run one after another (each hands off to the next), so up to 12 workers run at
a time. The run's `server` setting routes every worker through a
fault-injecting TCP proxy on 127.0.0.1; the driver itself reads the database through
sdm_peer.store.Store. An experiment sleeps 0.5-2.5 s and writes {"key", "digest"} (the digest of
its params); one in twenty fails its first attempt on purpose (ERROR, then retried). The number
of experiments per config grows with `duration` so that the study lasts about that long.

For `duration` seconds (or until the study is done, if sooner), every 1-4 s the driver injects
one fault; the first six are one of each kind, in a seeded order, the rest drawn by weight
(a kind that finds no target at its turn, e.g. no worker holding a lease, is owed and comes
first at the next turn that has one):

  kill9      SIGKILL of a worker holding a lease, then of its command (a VM that vanishes)
  sigterm    SIGTERM of a worker holding a lease (a preemption notice)
  server     SIGKILL of the server; 0.5-3 s later it is restarted on the same port
             (`sdm-peer serve --dir RUN --port P`)
  drop       the proxy closes both sides of 1, 2, 3 or all of the live connections
  stall      the proxy stops forwarding on 1, 2, 3 or all connections, both ways, for
             0.5 s to twice the lease period, then resumes
  half_open  the proxy stops forwarding one direction (chosen at random) of 1, 2 or 3
             connections for good, without closing either side

Afterwards it asserts: every experiment DONE, with exactly one attempt ending DONE, and its
result intact (the key and the digest of its params); none STARTED; every config DONE, the
`config_done` events in sequence order, exactly one `handoff` event per config; no process
whose command line names the run's directory is left; PRAGMA integrity_check is ok.

Figures (all times are wall-clock seconds; the database's times are the server's clock, the
same machine's):

  faults       injected, by kind (a fault with no target, e.g. no worker holding a lease, is
               not injected and not counted)
  re-runs      attempts beyond an experiment's first whose previous attempt did not end
               ERROR: work done again because of a fault, not because the command failed
  wasted command-seconds
               the sum over attempts that did not end DONE (ERROR, LOST, INTERRUPTED,
               EXPIRED) of the wall seconds the worker reported (ERROR, LOST: a late result),
               else of claim-to-end seconds (INTERRUPTED, EXPIRED: the lease was held and no
               result came of it)
  recovery     per fault, then per kind as count / median / max:
               kill9, sigterm: from the signal until the victim's experiment is claimed again
                   (not counted when the victim reported its result before dying)
               server: from the kill until the next claim is served (the downtime included)
               drop, stall, half_open: from the fault until every worker whose connection was
                   hit has had an answer through the proxy again (on a new connection, or on
                   the resumed one); a worker killed or gone before that is left out
"""

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sdm_peer import settings as settings_mod
from sdm_peer import states as st
from sdm_peer.run import bootstrap, stop
from sdm_peer.providers.local import LocalProvider
from sdm_peer.rundir import RunDir
from sdm_peer.store import Store

from .runs import init, processes_of

KINDS = ("kill9", "sigterm", "server", "drop", "stall", "half_open")
WEIGHTS = {"kill9": 3, "sigterm": 2, "server": 1, "drop": 2, "stall": 2, "half_open": 1}
CONFIGS = 6
MIN_EXPERIMENTS = 20
GROUP_SIZE = 12
# One config's group at a time, with as many of its VMs as this holds (12 one-core workers, 3
# four-core): the local provider's default is this machine's cores, far fewer workers.
MAX_VCPUS = GROUP_SIZE
SHAPES = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 8), (4, 16), (8, 16), (8, 32)]
LEASE_SECONDS = 3
PROVISION_LEASE_SECONDS = 5
MAX_INTERRUPTIONS = 1000  # faults here are many and artificial; the budget is not what is tested
SLEEP = (0.5, 2.5)  # seconds an experiment runs
FLAKY = 0.05  # share of experiments whose first attempt fails
FAULT_GAP = (1.0, 4.0)  # seconds between faults
VICTIM_MARGIN = 0.5  # seconds a signalled victim's experiment should still have to run
DOWNTIME = (0.5, 3.0)  # seconds the server stays dead
HANDOFF_SECONDS = 5.0  # roughly what a group's start costs, for sizing the study
SERVER_START_TIMEOUT = 20.0
SETTLE_TIMEOUT = 60.0  # for the groups to end once every config is DONE
PROXY_LINE_LIMIT = 2 * 1024 * 1024  # above the protocol's 1 MiB lines

JOB = r'''
import hashlib, json, os, sys, time
params = json.loads(os.environ["SDM_PARAMS"])
if params.get("flaky") and os.environ["SDM_ATTEMPT"] == "1":
    print("flaky on purpose", file=sys.stderr)
    sys.exit(3)
time.sleep(params["sleep"])
digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
with open(os.environ["SDM_RESULT_FILE"], "w") as out:
    json.dump({"key": os.environ["SDM_EXPERIMENT_KEY"], "digest": digest}, out)
'''


def digest(params):
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the fault-injecting proxy


class _Connection:
    def __init__(self, number, writers):
        self.number = number
        self.writers = writers  # (to the client, to the server)
        self.worker = None  # learnt from the requests it carries
        self.gates = {"up": asyncio.Event(), "down": asyncio.Event()}  # set: forwarding
        for gate in self.gates.values():
            gate.set()
        self.hit = False  # stalled now, or half-open for good
        self.pending = collections.deque()  # ops forwarded up, waiting for their answer
        self.tasks = []


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1, in a thread, between workers and the server.

    It forwards whole lines (the protocol is newline-delimited JSON), so it can tell which worker
    a connection belongs to (a `worker_id` in a request, or a lease token it saw handed out) and
    when a worker last got an answer. Faults are injected from the driver's thread."""

    def __init__(self):
        self.port = None
        self.upstream_port = None
        self.answers = collections.defaultdict(list)  # worker -> times it got an answer
        self._tokens = {}  # lease token -> worker
        self._connections = {}
        self._numbers = iter(range(1, 1 << 62))
        self._ready = threading.Event()
        self._thread = None
        self.loop = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self._server = self.loop.run_until_complete(asyncio.start_server(
            self._accept, "127.0.0.1", 0, limit=PROXY_LINE_LIMIT))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def stop(self):
        if self.loop is None or not self._thread.is_alive():
            return
        try:
            self._in_loop(self._shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    async def _shutdown(self):
        self._server.close()
        for connection in list(self._connections.values()):
            self._close(connection)
        await asyncio.sleep(0)

    def _in_loop(self, coroutine, timeout=5):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _accept(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port, limit=PROXY_LINE_LIMIT), 5)
        except (OSError, asyncio.TimeoutError):  # the server is down: the client sees a closed connection
            client_writer.close()
            return
        connection = _Connection(next(self._numbers), (client_writer, server_writer))
        self._connections[connection.number] = connection
        connection.tasks = [asyncio.ensure_future(self._pump(connection, client_reader, server_writer, "up")),
                            asyncio.ensure_future(self._pump(connection, server_reader, client_writer, "down"))]
        try:
            await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._close(connection)

    async def _pump(self, connection, reader, writer, direction):
        gate = connection.gates[direction]
        try:
            while True:
                await gate.wait()  # a closed gate reads nothing: the sender's buffers fill
                line = await reader.readline()
                if not line:
                    return
                await gate.wait()
                self._observe(connection, direction, line)
                writer.write(line)
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return

    def _observe(self, connection, direction, line):
        try:
            message = json.loads(line)
        except ValueError:
            message = {}
        message = message if isinstance(message, dict) else {}
        if direction == "up":
            args = message.get("args") if isinstance(message.get("args"), dict) else {}
            worker = args.get("worker_id") or self._tokens.get(args.get("lease_token"))
            if isinstance(worker, str):
                connection.worker = worker
            connection.pending.append(message.get("op"))
            return
        op = connection.pending.popleft() if connection.pending else None
        if connection.worker is None:
            return
        self.answers[connection.worker].append(time.time())
        experiment = (message.get("result") or {}).get("experiment") if op == "claim" else None
        if isinstance(experiment, dict) and experiment.get("lease_token"):
            self._tokens[experiment["lease_token"]] = connection.worker

    def _close(self, connection):
        if self._connections.pop(connection.number, None) is None:
            return
        for task in connection.tasks:
            task.cancel()
        for writer in connection.writers:
            writer.close()

    def inject(self, kind, choose, *, seconds=None, direction=None):
        """Apply a proxy fault to the connections `choose(candidates)` picks among those whose
        worker is known and that are not already stalled or half-open. Returns the workers hit."""
        return self._in_loop(self._inject(kind, choose, seconds, direction))

    async def _inject(self, kind, choose, seconds, direction):
        candidates = sorted((c for c in self._connections.values() if c.worker and not c.hit),
                            key=lambda c: c.number)
        picked = choose(candidates) if candidates else []
        for connection in picked:
            if kind == "drop":
                self._close(connection)
            elif kind == "stall":
                connection.hit = True
                for gate in connection.gates.values():
                    gate.clear()
                self.loop.call_later(seconds, self._resume, connection)
            elif kind == "half_open":
                connection.hit = True
                connection.gates[direction].clear()
        return [connection.worker for connection in picked]

    @staticmethod
    def _resume(connection):
        connection.hit = False
        for gate in connection.gates.values():
            gate.set()


# ---------------------------------------------------------------- processes


def _read_store(run, function):
    store = Store(run.db, create=False)
    try:
        return function(store)
    finally:
        store.close()


def _stat(pid):
    """(state, ppid) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid):
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid):
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(entry.name)
            if stat and stat[1] == pid and stat[0] != "Z":
                children.append(int(entry.name))
    return children


def _ancestors():
    """This process and those above it (a `timeout` wrapper, make): their command lines may
    name the run's directory, and they are not the run's."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        stat = _stat(pid)
        pid = stat[1] if stat else 0
    return pids


def leftovers(base):
    """Live processes whose command line names `base` (the run's and the job's directory)."""
    ours = _ancestors()
    return [(pid, command) for pid, command in processes_of(base) if pid not in ours]


def _live_workers(run):
    """{worker id: pid} of the workers of the groups not deleted, read from their command lines."""
    provider = LocalProvider(run)
    found = {}
    for record in provider.groups():
        if record.get("deleted"):
            continue
        for pid in provider.worker_pids(record["config"]):
            args = _cmdline(pid)
            if _alive(pid) and b"--worker-id" in args and str(run.path).encode() in b" ".join(args):
                found[args[args.index(b"--worker-id") + 1].decode()] = pid
    return found


class ServerProcess:
    """`sdm-peer serve --dir RUN --port P` started and killed by the driver."""

    def __init__(self, run):
        self.run, self.process, self.port = run, None, 0

    def start(self):
        command = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(self.run.path), "--port", str(self.port)]
        with open(self.run.server_log, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            info = self.run.server_info() if self.run.server_file.exists() else None
            if info and info.get("pid") == self.process.pid:
                self.port = info["port"]
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.run.server_log}")
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start within {SERVER_START_TIMEOUT}s")

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


# ---------------------------------------------------------------- the run


def plan_rows(rng, duration):
    """CONFIGS configs, one after another, each with enough experiments to keep its group's
    workers (as many as MAX_VCPUS holds) busy for its share of about `duration` seconds."""
    mean = sum(SLEEP) / 2 + 0.4  # + the command's start and the reports
    share = (duration - CONFIGS * HANDOFF_SECONDS) / CONFIGS
    rows = []
    for cores, memory in SHAPES[:CONFIGS]:
        workers = min(GROUP_SIZE, MAX_VCPUS // cores)
        for i in range(max(MIN_EXPERIMENTS, int(share * workers / mean))):
            rows.append({"cores": cores, "memory_gb": memory, "key": f"c{cores}-m{memory}-{i:04d}",
                         "group_size": GROUP_SIZE, "sleep": round(rng.uniform(*SLEEP), 2),
                         "flaky": rng.random() < FLAKY})
    return rows


class Chaos:
    def __init__(self, seed, duration, base):
        self.seed, self.duration, self.base = seed, duration, Path(base)
        self.rng = random.Random(seed)
        self.run = RunDir(self.base / "run")
        self.proxy = FaultProxy()
        self.server = ServerProcess(self.run)
        self.faults = []  # {"kind", "at", ...}
        self.killed = {}  # worker id -> when the driver killed or stopped it

    def log(self, text):
        print(f"chaos {time.strftime('%H:%M:%S')} {text}", flush=True)

    # ----- setting up

    def setup(self):
        self.run.path.mkdir(parents=True)
        job = self.base / "job.py"
        job.write_text(JOB)
        self.rows = plan_rows(self.rng, self.duration)
        self.proxy.start()
        settings = settings_mod.validate({
            # Shapes up to 4 cores on any machine: chaos is about faults, not timings, so unconfined.
            "provider": "local", "confine": "none", "command": [sys.executable, str(job)],
            "lease_seconds": LEASE_SECONDS, "max_vcpus": MAX_VCPUS,
            "provision_lease_seconds": PROVISION_LEASE_SECONDS, "max_interruptions": MAX_INTERRUPTIONS,
            "server": f"127.0.0.1:{self.proxy.port}"})
        init(self.run, self.rows, **settings)
        self.server.start()
        self.proxy.upstream_port = self.server.port
        bootstrap(self.run)

    def study_done(self):
        configs = _read_store(self.run, lambda store: store.status(now=time.time())["configs"])
        return all(config["state"] == st.CONFIG_DONE for config in configs)

    # ----- faults

    def inject_next(self, due):
        """Inject one fault: of the first kind in `due` (at the start one of each, shuffled)
        that finds a target now (a worker holding a lease, a connection), else of a kind drawn
        by weight. A drawn kind that finds no target is owed: it goes to `due`."""
        drawn = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        for kind in [*due, drawn]:
            fault = getattr(self, "fault_" + kind)()
            if fault is not None:
                if kind in due:
                    due.remove(kind)
                return {"kind": kind, **fault}
        if drawn not in due:
            due.append(drawn)
        self.log(f"no target for {', '.join(due)} now")
        return None

    def _victim(self):
        """A live worker holding a lease, with the key it holds; (None, None, None) if none.
        One whose experiment has a while left to run if there is one: a victim whose report
        lands just before the signal shows no recovery."""
        workers = _live_workers(self.run)
        holding = {a["worker"]: a for a in _read_store(self.run, lambda store: store.attempts())
                   if a["outcome"] is None}
        candidates = sorted(worker for worker in workers if worker in holding)
        if not candidates:
            return None, None, None
        now = time.time()
        sleep = {row["key"]: 0.0 if row["flaky"] else row["sleep"] for row in self.rows}  # flaky: may exit at once
        lasting = [worker for worker in candidates
                   if holding[worker]["claimed_at"] + sleep[holding[worker]["key"]] - now > VICTIM_MARGIN]
        worker = self.rng.choice(lasting or candidates)
        return worker, workers[worker], holding[worker]["key"]

    def fault_kill9(self):
        worker, pid, key = self._victim()
        if worker is None:
            return None
        commands = _children(pid)
        at = time.time()
        os.kill(pid, signal.SIGKILL)
        for command in commands:
            if str(self.base).encode() in b" ".join(_cmdline(command)):
                try:
                    os.killpg(command, signal.SIGKILL)  # the command leads its own session
                except ProcessLookupError:
                    pass
        self.killed.setdefault(worker, at)
        return {"at": at, "worker": worker, "key": key, "commands": len(commands)}

    def fault_sigterm(self):
        worker, pid, key = self._victim()
        if worker is None:
            return None
        at = time.time()
        os.kill(pid, signal.SIGTERM)
        self.killed.setdefault(worker, at)
        return {"at": at, "worker": worker, "key": key}

    def fault_server(self):
        downtime = round(self.rng.uniform(*DOWNTIME), 2)
        at = time.time()
        self.server.kill()
        time.sleep(downtime)
        self.server.start()
        return {"at": at, "downtime": downtime, "restarted_at": time.time()}

    def _proxy_fault(self, kind, **options):
        # Half-open connections hold their workers for the client's whole call timeout (30 s):
        # on every connection at once they would stop the study for that long (see the report).
        how_many = self.rng.choice([1, 2, 3] if kind == "half_open" else [1, 2, 3, "all"])

        def choose(candidates):
            return candidates if how_many == "all" else self.rng.sample(candidates, min(how_many, len(candidates)))
        at = time.time()
        workers = self.proxy.inject(kind, choose, **options)
        if not workers:
            return None
        return {"at": at, "workers": workers, **options}

    def fault_drop(self):
        return self._proxy_fault("drop")

    def fault_stall(self):
        return self._proxy_fault("stall", seconds=round(self.rng.uniform(0.5, 2 * LEASE_SECONDS), 2))

    def fault_half_open(self):
        return self._proxy_fault("half_open", direction=self.rng.choice(["up", "down"]))

    def rampage(self):
        """Inject faults until the deadline or the end of the study, whichever comes first."""
        started = time.monotonic()
        deadline = started + self.duration
        due = self.rng.sample(KINDS, len(KINDS))
        next_at = started + self.rng.uniform(*FAULT_GAP)
        while time.monotonic() < deadline:
            if self.study_done():
                self.log("the study is done before the deadline: no more faults")
                break
            if time.monotonic() >= next_at:
                fault = self.inject_next(due)
                if fault is not None:
                    self.faults.append(fault)
                    self.log(f"{fault['kind']}: {_describe(fault)}")
                next_at = time.monotonic() + self.rng.uniform(*FAULT_GAP)
            time.sleep(0.1)
        return time.monotonic() - started

    def settle(self, timeout):
        """Wait for the study to finish and its groups to end; the server goes last."""
        deadline = time.monotonic() + timeout
        while not self.study_done():
            if time.monotonic() > deadline:
                raise AssertionError(f"the study did not finish within {timeout:.0f}s after the faults stopped")
            time.sleep(0.2)
        finished = time.monotonic()
        while ([pid for pid, _ in leftovers(self.base) if pid != self.server.process.pid]
               and time.monotonic() < finished + SETTLE_TIMEOUT):
            time.sleep(0.2)
        self.server.terminate()
        return leftovers(self.base)

    # ----- checking and measuring

    def check(self, remaining):
        """Every invariant of the module's docstring; returns the list of violations."""
        problems = []
        experiments, attempts, status, events, integrity = _read_store(self.run, lambda store: (
            list(store.experiments()), store.attempts(), store.status(now=time.time()), store.events(),
            store.integrity_check()))
        done_attempts = collections.Counter(a["key"] for a in attempts if a["outcome"] == st.DONE)
        for experiment in experiments:
            key = experiment["key"]
            if experiment["status"] != st.DONE:
                problems.append(f"{key}: {experiment['status']} ({experiment['failed_reason']})")
            if done_attempts[key] != 1:
                problems.append(f"{key}: {done_attempts[key]} attempts ended DONE")
            if experiment["result"] != {"key": key, "digest": digest(experiment["params"])}:
                problems.append(f"{key}: result {experiment['result']!r} is not the command's")
        if len(experiments) != len(self.rows):
            problems.append(f"{len(experiments)} experiments in the database, {len(self.rows)} in the plan")
        if status["totals"]["started"]:
            problems.append(f"{status['totals']['started']} experiments left STARTED")
        configs = [config["name"] for config in status["configs"]]
        not_done = [config["name"] for config in status["configs"] if config["state"] != st.CONFIG_DONE]
        if not_done:
            problems.append(f"configs not DONE: {not_done}")
        done_order = [e["config"] for e in events if e["kind"] == "config_done"]
        if done_order != configs:
            problems.append(f"configs DONE in the order {done_order}, not {configs}")
        handoffs = collections.Counter(e["config"] for e in events if e["kind"] == "handoff")
        if handoffs != collections.Counter(configs):
            problems.append(f"hand-offs per config: {dict(handoffs)}")
        if remaining:
            problems.append(f"processes left behind: {remaining}")
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity}")
        self.attempts = attempts
        return problems

    def figures(self, fault_seconds, elapsed):
        attempts = self.attempts
        by_key = collections.defaultdict(list)
        for attempt in attempts:
            by_key[attempt["key"]].append(attempt)
        reruns = sum(1 for history in by_key.values() for before, after in zip(history, history[1:])
                     if before["outcome"] != st.ERROR)
        wasted = collections.Counter()
        for attempt in attempts:
            if attempt["outcome"] in (None, st.DONE):
                continue
            seconds = attempt["wall_seconds"]
            if seconds is None:
                seconds = attempt["ended_at"] - attempt["claimed_at"]
            wasted[attempt["outcome"]] += seconds
        recovery, unrecovered = collections.defaultdict(list), collections.Counter()
        for fault in self.faults:
            seconds = self.recovery(fault, by_key, attempts)
            fault["recovery"] = seconds
            if seconds is not None:
                recovery[fault["kind"]].append(seconds)
            unrecovered[fault["kind"]] += fault.get("unanswered", seconds is None)
        return {
            "seed": self.seed, "duration": self.duration, "fault_seconds": round(fault_seconds, 1),
            "elapsed": round(elapsed, 1), "configs": CONFIGS, "experiments": len(self.rows),
            "workers": GROUP_SIZE, "lease_seconds": LEASE_SECONDS,
            "faults": {kind: sum(1 for f in self.faults if f["kind"] == kind) for kind in KINDS},
            "attempts": dict(collections.Counter(a["outcome"] for a in attempts)),
            "reruns": reruns,
            "wasted_command_seconds": round(sum(wasted.values()), 1),
            "wasted_by_outcome": {outcome: round(seconds, 1) for outcome, seconds in sorted(wasted.items())},
            "recovery": {kind: {**_spread(recovery.get(kind, [])), "not_seen": unrecovered[kind]} for kind in KINDS},
        }

    def recovery(self, fault, by_key, attempts):
        at = fault["at"]
        if fault["kind"] in ("kill9", "sigterm"):
            later = [a["claimed_at"] for a in by_key[fault["key"]] if a["claimed_at"] > at]
            return min(later) - at if later else None
        if fault["kind"] == "server":
            later = [a["claimed_at"] for a in attempts if a["claimed_at"] > at]
            return min(later) - at if later else None
        waits, fault["unanswered"] = [], 0
        for worker in fault["workers"]:
            answered = next((t for t in self.proxy.answers.get(worker, ()) if t > at), None)
            killed = self.killed.get(worker)
            if answered is not None and (killed is None or killed < at or answered < killed):
                waits.append(answered - at)
            elif killed is None or killed < at:
                fault["unanswered"] += 1  # ended by its group's deletion, or still waiting then
        return max(waits) if waits else None

    # ----- all of it

    def execute(self):
        started = time.monotonic()
        self.log(f"seed {self.seed}, duration {self.duration}s, run {self.run.path}")
        remaining = []
        try:
            self.setup()
            self.log(f"{CONFIGS} configs, {len(self.rows)} experiments, up to {GROUP_SIZE} workers a group within "
                     f"max_vcpus {MAX_VCPUS}, "
                     f"lease {LEASE_SECONDS}s; workers through the proxy on 127.0.0.1:{self.proxy.port}, "
                     f"server on 127.0.0.1:{self.server.port}")
            fault_seconds = self.rampage()
            self.log(f"faults stopped after {fault_seconds:.0f}s; waiting for the study to finish")
            remaining = self.settle(timeout=max(180.0, self.duration))
        finally:
            self.server.terminate()
            self.proxy.stop()
            stop(self.run)
            for pid, _ in leftovers(self.base):  # only after a broken run: every process is ours
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        problems = self.check(remaining)
        figures = self.figures(fault_seconds, time.monotonic() - started)
        return figures, problems


def _describe(fault):
    return ", ".join(f"{key}={value}" for key, value in fault.items() if key not in ("at", "kind"))


def _spread(values):
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


NOT_SEEN = {"kill9": "the victim had reported first", "sigterm": "the victim had reported first",
            "server": "no claim after the restart", **dict.fromkeys(
                ("drop", "stall", "half_open"), "workers that ended with their group before another answer")}


def format_figures(figures):
    lines = [f"chaos figures (seed {figures['seed']}): {figures['configs']} configs, {figures['experiments']} "
             f"experiments, {figures['workers']} workers, lease {figures['lease_seconds']}s; faults for "
             f"{figures['fault_seconds']}s, {figures['elapsed']}s in all",
             "  faults injected: " + ", ".join(f"{kind} {n}" for kind, n in figures["faults"].items())
             + f" (total {sum(figures['faults'].values())})",
             "  attempts: " + ", ".join(f"{outcome} {n}" for outcome, n in sorted(figures["attempts"].items(),
                                                                                  key=str)),
             f"  re-runs: {figures['reruns']}",
             f"  wasted command-seconds: {figures['wasted_command_seconds']} "
             f"({', '.join(f'{k} {v}' for k, v in figures['wasted_by_outcome'].items()) or 'none'})",
             "  recovery seconds (n / median / max):"]
    for kind, spread in figures["recovery"].items():
        text = f"{spread['n']} / {spread['median']} / {spread['max']}" if spread["n"] else "0 / - / -"
        if spread["not_seen"]:
            text += f"  ({spread['not_seen']} not seen: {NOT_SEEN[kind]})"
        lines.append(f"    {kind:<10} {text}")
    return "\n".join(lines)


def run(seed, duration, base):
    """Run the chaos study under `base`; return its figures, or raise AssertionError listing
    every invariant it broke (with the figures)."""
    chaos = Chaos(seed, duration, base)
    figures, problems = chaos.execute()
    figures["fault_log"] = chaos.faults
    (Path(base) / "chaos.json").write_text(json.dumps(figures, indent=1))
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise AssertionError(f"chaos run (seed {seed}) broke its invariants:\n  " + "\n  ".join(shown)
                             + "\n" + format_figures(figures))
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="the random seed (default: a new one, printed)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults (default 300)")
    parser.add_argument("--dir", type=Path, help="where the run goes (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary run directory that passed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1_000_000)
    print(f"chaos seed {seed}", flush=True)
    base = options.dir or Path(tempfile.mkdtemp(prefix="sdm-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        figures = run(seed, options.duration, base)
    except AssertionError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        print(f"the run and its fault log (chaos.json) are in {base}", file=sys.stderr)
        return 1
    print(format_figures(figures), flush=True)
    if options.json:
        print(json.dumps({k: v for k, v in figures.items() if k != "fault_log"}, indent=2))
    if options.dir or options.keep:
        print(f"all invariants hold; the run, its figures and its fault log (chaos.json) are in {base}", flush=True)
    else:
        shutil.rmtree(base)
        print("all invariants hold", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

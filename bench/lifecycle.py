"""Whole-system timings with real processes (tests/runs.py's helpers):

  recovery  `sdm-peer serve --lease-seconds 2` and two `sdm-peer work`: the victim runs a long
            experiment, the survivor has nothing left to do and waits; the victim and its
            command are SIGKILLed; seconds from the kill to the survivor's claim of that
            experiment (its attempt 2, server clock).
  hand-off  `sdm-peer bootstrap --provider local` with a few configs of short experiments:
            seconds from each config's `config_done` event (the report that finished it) to
            the next config's `config_running` event (its group's first claim).
"""

import os
import random
import signal
import time
from pathlib import Path

from common import kill_pid, median, stop_process, wait_for  # first: puts the repository on sys.path
from tests import runs
from sdm_peer.rundir import RunDir
from sdm_peer.settings import RENEW_FRACTION
from sdm_peer.store import Store

SHAPE = (1, 1)
WORKER_STOP = 25.0  # a worker exits within 20 s of SIGTERM (DESIGN §5)


def _attempts(run, key):
    return runs.with_store(run, lambda store: store.attempts(key))


def recovery_round(directory, lease_seconds):
    run = RunDir(Path(directory) / "run")
    Path(directory).mkdir(parents=True)
    command = runs.job_command(directory)
    runs.init(run, [{"key": "victim", "cores": SHAPE[0], "memory_gb": SHAPE[1], "sleep": 120},
                    {"key": "other", "cores": SHAPE[0], "memory_gb": SHAPE[1], "sleep": 0.1}])
    server = runs.start_server(run, lease_seconds=lease_seconds)
    victim = survivor = None
    commands = []
    try:
        victim = runs.start_worker(run, SHAPE, command, worker_id="victim")
        wait_for(lambda: _attempts(run, "victim"), 30, what="the victim's claim")
        pid_file = run.work / "victim" / "attempt-1" / "pid"
        commands.append(int(wait_for(lambda: pid_file.exists() and pid_file.read_text().split(), 30,
                                     what="the victim's command")[0]))
        survivor = runs.start_worker(run, SHAPE, command, worker_id="survivor")
        wait_for(lambda: runs.status(run)["totals"]["done"] == 1, 30, what="the survivor's experiment")
        # Kill at a random moment of the victim's renewal period.
        time.sleep(0.2 + random.uniform(0, lease_seconds * RENEW_FRACTION))
        store = Store(run.db, create=False)
        try:
            killed_at = time.time()
            left = next(lease["seconds_left"] for lease in store.leases(now=killed_at) if lease["key"] == "victim")
            os.kill(victim.pid, signal.SIGKILL)
            kill_pid(commands[0])
            reclaimed = wait_for(lambda: [a for a in store.attempts("victim") if a["number"] == 2],
                                 lease_seconds * 5 + 10, what="the re-claim")[0]
        finally:
            store.close()
        pid_file = run.work / "victim" / "attempt-2" / "pid"
        try:  # the survivor's command, to be sure it ends with the round
            commands.append(int(wait_for(lambda: pid_file.exists() and pid_file.read_text().split(), 10)[0]))
        except RuntimeError:
            pass
        seconds = reclaimed["claimed_at"] - killed_at
        return {"seconds": seconds, "lease_left_at_kill": left, "after_expiry": seconds - left,
                "by": reclaimed["worker"]}
    finally:
        for worker in (survivor, victim):
            stop_process(worker, WORKER_STOP)
        for pid in commands:
            kill_pid(pid)
        stop_process(server)
        server.stdout.close()
        runs.kill_all(directory)  # anything of this scratch directory still alive (there should be none)


def recovery(directory, *, rounds, lease_seconds=2.0):
    results = [recovery_round(Path(directory) / f"round-{number}", lease_seconds) for number in range(rounds)]
    seconds = [result["seconds"] for result in results]
    return {"lease_seconds": lease_seconds, "renew_every": lease_seconds * RENEW_FRACTION, "rounds": results,
            "median_s": median(seconds), "max_s": max(seconds),
            "median_after_expiry_s": median([result["after_expiry"] for result in results])}


def handoff(directory, *, configs, per_config=4, group_size=2):
    directory = Path(directory)
    directory.mkdir(parents=True)
    run = RunDir(directory / "run")
    rows = [{"cores": 1, "memory_gb": number + 1, "group_size": group_size, "i": i, "sleep": 0.05}
            for number in range(configs) for i in range(per_config)]
    plan = runs.plan_file(directory, rows)
    command = runs.job_command(directory)
    try:
        runs.sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--", *command)
        wait_for(lambda: runs.all_done(run), 30 + 15 * configs, interval=0.1, what="every config DONE")
        store = Store(run.db, create=False)
        try:
            order = [config["name"] for config in store.status(now=time.time())["configs"]]
            events = store.events()
        finally:
            store.close()
    finally:
        runs.sdm("stop", "--dir", run.path, check=False)
        runs.kill_all(directory)
    done = {event["config"]: event["at"] for event in events if event["kind"] == "config_done"}
    running = {event["config"]: event["at"] for event in events if event["kind"] == "config_running"}
    gaps = [running[after] - done[before] for before, after in zip(order, order[1:])
            if before in done and after in running]
    return {"configs": configs, "handoffs": len(gaps), "seconds": gaps, "median_s": median(gaps),
            "max_s": max(gaps) if gaps else None}

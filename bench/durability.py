"""Recovery point and recovery time of losing the database VM (README "Durability").

A study runs with the server under Litestream (file:// replica) and 4 local workers; the server
and Litestream are SIGKILLed, the database, its WAL and Litestream's state deleted, and a new
server restores the replica. Measured, over --rounds rounds:

  recovery point  reports acknowledged before the kill that the restored database lacks
                  (counted, and how long before the kill the oldest of them was acknowledged)
  recovery time   seconds from the kill until the new server listens (restore included), and
                  until the first claim served after it

Usage: .venv/bin/python bench/durability.py [--rounds 3] [--experiments 200]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdm_peer.run import init_run
from sdm_peer.rundir import RunDir
from sdm_peer.store import Store

JOB = "import os, time; time.sleep(0.05); open(os.environ[\"SDM_RESULT_FILE\"], \"w\").write(\"{}\")"


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.01)
    raise SystemExit("timed out")


def start_server(run, replica, port=0):
    run.server_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port",
                                str(port), "--replicate", "--replica", replica],
                               stdout=subprocess.DEVNULL, stderr=open(run.path / "server.log", "ab"))
    listening = wait_for(run.server_file.exists)
    return process, listening


def done_keys(run):
    store = Store(run.db, create=False)
    try:
        return {e["key"] for e in store.experiments() if e["status"] == "DONE"}
    finally:
        store.close()


def one_round(scratch, experiments):
    run = RunDir(scratch / "run")
    run.path.mkdir(parents=True)
    plan = scratch / "plan.json"
    plan.write_text(json.dumps([{"cores": 1, "memory_gb": 1, "i": i} for i in range(experiments)]))
    init_run(run.db, plan, {"lease_seconds": 5, "command": [sys.executable, "-c", JOB]})
    replica = f"file://{scratch / 'replica'}"
    litestream, _ = start_server(run, replica)
    port = run.server_info()["port"]
    workers = [subprocess.Popen([sys.executable, "-m", "sdm_peer", "work", "--dir", str(run.path), "--cores", "1",
                                 "--memory-gb", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(4)]
    wait_for(lambda: len(done_keys(run)) >= experiments // 3)
    acknowledged = done_keys(run)  # read just before the kill: every one of these was acknowledged
    killed_at = time.time()
    os.kill(run.server_info()["pid"], signal.SIGKILL)
    litestream.kill()
    litestream.wait()
    for path in run.path.glob("sdm.db*"):
        if path.name != "sdm.db.token":
            path.unlink()
    shutil.rmtree(run.path / ".sdm.db-litestream", ignore_errors=True)
    litestream, listening = start_server(run, replica, port)
    restored = done_keys(run)
    store = Store(run.db, create=False)
    first_claim = wait_for(lambda: any(a["claimed_at"] > listening for a in store.attempts()))
    lost = acknowledged - restored
    ages = []
    for key in lost:  # the command's result file was written just before the report was acknowledged
        results = list((run.work / key).glob("*/result.json"))
        ages += [killed_at - path.stat().st_mtime for path in results]
    for worker in workers:
        worker.wait(timeout=120)
    store.close()
    os.kill(run.server_info()["pid"], signal.SIGTERM)
    litestream.wait(timeout=20)
    return {"acknowledged": len(acknowledged), "lost": len(lost), "oldest_lost_s": max(ages, default=0.0),
            "listening_s": listening - killed_at, "first_claim_s": first_claim - killed_at}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--experiments", type=int, default=200)
    args = parser.parse_args()
    rounds = []
    for number in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="sdm-durability-") as scratch:
            rounds.append(one_round(Path(scratch), args.experiments))
        print(f"round {number + 1}: {rounds[-1]}", file=sys.stderr)
    print("| figure | median | worst |")
    print("| --- | --- | --- |")
    for field, label in (("lost", "acknowledged reports lost"), ("oldest_lost_s", "oldest lost report, s before kill"),
                         ("listening_s", "kill -> new server listening, s"),
                         ("first_claim_s", "kill -> first claim served, s")):
        values = [r[field] for r in rounds]
        print(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()

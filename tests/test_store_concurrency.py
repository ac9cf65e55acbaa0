"""Four real processes share one database file: every experiment is done exactly once.

Each process opens its own Store (its own connection, as each server thread would) and loops
claim -> complete for both shapes with the real clock, until neither shape has anything left
and both configs are DONE. SQLite's write lock (BEGIN IMMEDIATE + busy timeout) is all that
keeps two processes from taking the same experiment; the rows afterwards say whether it did."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from sdm_peer import states as st
from sdm_peer.store import Store

from .conftest import grid

PROCESSES = 4
SHAPES = [(2, 4), (4, 8)]
PER_CONFIG = 200
LEASE = 30.0

WORKER = r"""
import json, random, sys, time
from sdm_peer.store import Store

db, worker = sys.argv[1], sys.argv[2]
shapes = json.loads(sys.argv[3])
store = Store(db, create=False)
print("ready", flush=True)
sys.stdin.readline()  # wait until every process is up, so they really run side by side
claims = completions = idle = 0
keys = []
done = set()
turn = 0
while len(done) < len(shapes):
    shape = shapes[turn % len(shapes)]
    turn += 1
    answer = store.claim(worker, *shape, now=time.time(), lease_seconds=LEASE)
    experiment = answer["experiment"]
    if experiment is None:
        if answer["config_done"]:
            done.add(tuple(shape))
        else:
            idle += 1  # the rest of this config is held by the others; they finish it soon
            time.sleep(0.005)
        continue
    claims += 1
    keys.append(experiment["key"])
    time.sleep(random.uniform(0, 0.003))  # "runs" it, holding the lease while the others claim
    store.complete(experiment["lease_token"], {"by": worker, "key": experiment["key"]}, 0.001,
                   now=time.time())
    completions += 1
store.close()
print(json.dumps({"worker": worker, "claims": claims, "completions": completions, "idle": idle,
                  "keys": keys}), flush=True)
""".replace("LEASE", repr(LEASE))


@pytest.mark.timeout(180)
def test_four_processes_complete_every_experiment_exactly_once(make_store):
    store = make_store(grid(SHAPES, PER_CONFIG), provider="local")
    db = str(store.path)
    store.close()
    shapes = json.dumps([list(shape) for shape in SHAPES])
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, db, f"p{n}", shapes], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for n in range(PROCESSES)]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        reports = []
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    total = len(SHAPES) * PER_CONFIG
    store = Store(db, create=False)
    try:
        conn = store.conn
        claimed = Counter(key for report in reports for key in report["keys"])
        assert len(claimed) == total and set(claimed.values()) == {1}, "an experiment was handed out twice"
        assert sum(report["completions"] for report in reports) == total
        assert sum(report["claims"] for report in reports) == total
        assert all(report["claims"] > 0 for report in reports), reports  # all four really took part

        statuses = Counter(status for (status,) in conn.execute("SELECT status FROM experiments"))
        assert statuses == {st.DONE: total}
        assert conn.execute("SELECT COUNT(*) FROM experiments WHERE attempts != 1 OR interruptions != 0"
                            " OR failures != 0 OR lease_token IS NOT NULL").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == total
        outcomes = Counter(outcome for (outcome,) in conn.execute("SELECT outcome FROM attempts"))
        assert outcomes == {st.DONE: total}, "an attempt expired or was lost: two live leases existed"
        # The experiment's result was written by the process that claimed it, and no other.
        by_key = {key: report["worker"] for report in reports for key in report["keys"]}
        for key, result, worker in conn.execute(
                "SELECT e.key, e.result, a.worker FROM experiments e JOIN attempts a ON a.experiment = e.id"):
            assert json.loads(result) == {"by": by_key[key], "key": key} and worker == by_key[key]

        configs = {c["name"]: c for c in store.status(now=0)["configs"]}
        assert {name: c["state"] for name, c in configs.items()} == {"c2-m4": "DONE", "c4-m8": "DONE"}
        assert all(c["done"] == PER_CONFIG for c in configs.values())
        done_events = Counter(e["config"] for e in store.events(kind="config_done"))
        assert done_events == {"c2-m4": 1, "c4-m8": 1}
        assert all(count <= 1 for count in Counter(e["config"] for e in store.events(kind="handoff")).values())
    finally:
        store.close()

"""Each local command confined to its shape (DESIGN §9): CPUs no other running worker has, the
shape's memory as its cgroup's limit, its shape in its environment, an OOM named as such, and
where it ran recorded with its attempt. Real workers, real cgroups (where this machine lets us
make them), real commands."""

import json
import os
import signal
import subprocess
import sys

import pytest

from sdm_peer.confine import GIB, CpuAllocator, Layout, cpu_list, parse_cpu_list, shape_environment
from sdm_peer.export import export

from .runs import experiments, init, sdm, start_server, start_worker, wait_for, with_store

# Writes what it sees, then waits until every other command of the test has written too (so
# they provably ran at the same time), up to 60 s.
SEER = r'''
import json, os, sys, time
def memory_limit():
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        if controllers == "":
            name = "memory.max"
        elif "memory" in controllers.split(","):
            name = "memory.limit_in_bytes"
        else:
            continue
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"):
            try:
                return open(root + path + "/" + name).read().strip()
            except OSError:
                pass
    return None
params = json.loads(os.environ["SDM_PARAMS"])
seen = {"cpus": sorted(os.sched_getaffinity(0)), "memory_limit": memory_limit(),
        **{k: os.environ.get(k) for k in ("SDM_CORES", "SDM_MEMORY_GB", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                          "OPENBLAS_NUM_THREADS", "MC_CORES")}}
meet = params["meet"]
with open(os.path.join(meet, params["name"] + ".tmp"), "w") as f:
    json.dump(seen, f)
os.replace(os.path.join(meet, params["name"] + ".tmp"), os.path.join(meet, params["name"] + ".json"))
deadline = time.monotonic() + 60
while len([n for n in os.listdir(meet) if n.endswith(".json")]) < params["of"]:
    if time.monotonic() > deadline:
        sys.exit("the other command never came")
    time.sleep(0.02)
json.dump(seen, open(os.environ["SDM_RESULT_FILE"], "w"))
'''

HOG = r'''
import sys
hog = b"x" * (600 * 2 ** 20)  # written, so every page is resident
print("allocated", len(hog))
'''


def cgroups_or_skip():
    """The writable cgroup layout here; without one a skip that says why (a failure under CI)."""
    layout, why = Layout.detect()
    if layout is None:
        message = f"no writable cgroup tree on this machine: {why}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return layout


def script(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


def run_side_by_side(run, tmp_path, shapes, **settings):
    """One experiment per shape, one worker per shape started at once; returns each command's view."""
    meet = tmp_path / "meet"
    meet.mkdir()
    rows = [{"cores": cores, "memory_gb": memory_gb, "name": f"s{i}", "meet": str(meet), "of": len(shapes)}
            for i, (cores, memory_gb) in enumerate(shapes)]
    init(run, rows, provider="local", command=script(tmp_path, SEER, "seer.py"), lease_seconds=5, **settings)
    server = start_server(run)
    workers = [start_worker(run, shape, worker_id=f"w{i}") for i, shape in enumerate(shapes)]
    try:
        for worker in workers:
            assert worker.wait(90) == 0
    finally:
        for process in (*workers, server):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    done = experiments(run)
    assert [e["status"] for e in done] == ["DONE"] * len(shapes), [e["failed_reason"] for e in done]
    return done


def test_two_one_core_shapes_at_once_get_a_cpu_each_no_other_has_and_their_memory_limit(run, tmp_path):
    cgroups_or_skip()
    done = run_side_by_side(run, tmp_path, [(1, 0.5), (1, 1)])
    seen = [e["result"] for e in done]
    assert [len(view["cpus"]) for view in seen] == [1, 1]
    assert not set(seen[0]["cpus"]) & set(seen[1]["cpus"])  # disjoint
    assert [int(view["memory_limit"]) for view in seen] == [GIB // 2, GIB]
    for view in seen:
        assert view["SDM_CORES"] == view["OMP_NUM_THREADS"] == view["MKL_NUM_THREADS"] == "1"
        assert view["OPENBLAS_NUM_THREADS"] == view["MC_CORES"] == "1"
    assert [view["SDM_MEMORY_GB"] for view in seen] == ["0.5", "1"]
    # Where each ran is in its attempt, and the CPUs recorded are the ones the command saw.
    for experiment, view in zip(done, seen):
        assert experiment["host_confinement"] == "cgroup"
        assert experiment["host_cpus"] == cpu_list(view["cpus"])
        assert experiment["host_max_rss_mb"] > 1 and experiment["host_steal_seconds"] >= 0
        assert experiment["host_cpu_model"]
    # The attempt's cgroups are gone, and so are the CPUs it held.
    layout = Layout.detect()[0]
    assert not [path for base in {layout.cpuset, layout.memory} for path in base.glob("sdm-peer-*")]
    assert json.loads((run.work / "cpus.json").read_text()) == {"held": {}, "queue": []}
    # export writes them as host_* columns.
    out = tmp_path / "out.jsonl"
    with_store(run, lambda store: export(store, out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["host_confinement"] for row in rows} == {"cgroup"}
    assert all(row["host_cpus"] for row in rows)


def test_forced_affinity_gives_disjoint_cpus_without_a_memory_limit(run, tmp_path):
    done = run_side_by_side(run, tmp_path, [(1, 0.5), (1, 1)], confine="affinity")
    seen = [e["result"] for e in done]
    assert [len(view["cpus"]) for view in seen] == [1, 1]
    assert not set(seen[0]["cpus"]) & set(seen[1]["cpus"])
    assert {e["host_confinement"] for e in done} == {"affinity"}
    assert [e["host_cpus"] for e in done] == [cpu_list(view["cpus"]) for view in seen]
    assert all(e["host_max_rss_mb"] > 1 for e in done)  # the command's own peak, from wait4


def test_a_command_past_its_memory_ends_error_naming_the_oom_and_the_limit(run, tmp_path):
    cgroups_or_skip()
    init(run, [{"cores": 1, "memory_gb": 0.25}], provider="local", command=script(tmp_path, HOG, "hog.py"),
         lease_seconds=5, max_failures=1)
    server = start_server(run)
    worker = start_worker(run, (1, 0.25))
    try:
        assert worker.wait(90) == 0
    finally:
        for process in (worker, server):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    (attempt,) = with_store(run, lambda store: store.attempts())
    assert attempt["outcome"] == "ERROR"
    assert attempt["error"].startswith("OOM:") and "0.25 GB" in attempt["error"], attempt["error"]
    assert attempt["exit_code"] == -signal.SIGKILL
    (experiment,) = experiments(run)
    assert experiment["status"] == "FAILED" and "OOM" in experiment["failed_reason"]
    assert experiment["host_max_rss_mb"] <= 256.5  # the group's peak, held at its limit


def test_a_shape_bigger_than_this_machine_is_refused_at_init_unless_unconfined(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"cores": len(os.sched_getaffinity(0)) + 1, "memory_gb": 1}]))
    refused = sdm("init", tmp_path / "a.db", "--plan", plan, "--set", "provider=local", check=False)
    assert refused.returncode == 2 and "bigger than this machine" in refused.stderr, refused.stderr
    assert not (tmp_path / "a.db").exists()
    sdm("init", tmp_path / "b.db", "--plan", plan, "--set", "provider=local", "--set", "confine=none")


def test_a_killed_workers_cpus_come_free(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sdm_peer.confine import CpuAllocator;"
         f"CpuAllocator(sys.argv[1]).acquire({cpus}, lambda: False); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        allocator = CpuAllocator(tmp_path)
        assert allocator.acquire(1, lambda: True) is None  # all held: it gives up when told to
    finally:
        holder.kill()
        holder.wait()
    assert allocator.acquire(cpus, lambda: False) == set(sorted(os.sched_getaffinity(0)))
    allocator.release()
    assert json.loads((tmp_path / "cpus.json").read_text()) == {"held": {}, "queue": []}


def test_the_shape_environment_keeps_thread_counts_the_user_set():
    env = shape_environment(4, 16.0, {"OMP_NUM_THREADS": "2"})
    assert env == {"SDM_CORES": "4", "SDM_MEMORY_GB": "16", "OPENBLAS_NUM_THREADS": "4", "MKL_NUM_THREADS": "4",
                   "MC_CORES": "4"}


def test_cpu_lists_read_and_write_as_the_kernel_does():
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpu_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}


def test_a_database_from_before_host_columns_reads_and_upgrades(tmp_path):
    import sqlite3

    from sdm_peer.store import HOST_COLUMNS, Store

    path = tmp_path / "old.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:  # the file as version 4 wrote it: no host_* columns
        for column in HOST_COLUMNS:
            conn.execute(f"ALTER TABLE attempts DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 4")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO configs (name, cores, memory_gb, sequence, group_size) VALUES ('c1-m1', 1, 1, 1, 1)")
        conn.execute("INSERT INTO experiments (key, config) VALUES ('k', 1)")
    with Store(path, readonly=True) as store:  # read as it is: host fields empty
        (row,) = store.experiments()
        assert row["host_cpus"] is None
    with Store(path) as store:  # opened for writing, it gains the columns
        claimed = store.claim(worker_id="w", cores=1, memory_gb=1, now=1.0, lease_seconds=60)["experiment"]
        store.complete(claimed["lease_token"], {}, 1.5, now=2.0, host={"cpus": "1", "confinement": "cgroup",
                                                                         "steal_seconds": 0.0, "novel": [1]})
        (row,) = store.experiments()
    assert (row["host_cpus"], row["host_confinement"], row["host_steal_seconds"]) == ("1", "cgroup", 0.0)

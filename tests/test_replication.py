"""Durability with the real litestream binary and a file:// replica: the database VM is lost,
a new server restores the replica, and the study completes with nothing lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sdm_peer import states as st
from sdm_peer.processes import replicator_of
from sdm_peer.replication import push, replica_backups
from sdm_peer.run import stop_server

from .runs import (init, job_command, sdm, shape_rows, start_worker, status, wait_for, with_store)

A = (1, 1)
SYNC_WINDOW = 3.0  # seconds: litestream.yml's monitor (1 s) + sync (1 s) intervals, and slack


def start_replicated_server(run, replica, port=0, extra=()):
    """`sdm-peer serve --dir RUN --replicate`: Litestream, with the server as its child."""
    run.server_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "sdm_peer", "serve", "--dir", str(run.path), "--port", str(port),
               "--replicate", "--replica", replica, *extra]
    litestream = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(run.path / "server.log", "ab"))
    wait_for(run.server_file.exists, what="the replicated server to listen")
    return litestream


def lose_the_vm(run, litestream):
    """SIGKILL the server and Litestream, then delete the database, its WAL and Litestream's state."""
    server_pid = run.server_info()["pid"]
    os.kill(server_pid, signal.SIGKILL)
    litestream.kill()
    litestream.wait()
    for path in run.path.glob("sdm.db*"):
        if path.name != "sdm.db.token":
            path.unlink()
    shutil.rmtree(run.path / ".sdm.db-litestream", ignore_errors=True)


def test_database_vm_lost_restored_from_the_replica_and_the_study_completes(run, tmp_path):
    replica = f"file://{tmp_path / 'replica'}"
    init(run, shape_rows(A, 30, sleep=0.3), lease_seconds=2)
    litestream = start_replicated_server(run, replica)
    port = run.server_info()["port"]
    workers = [start_worker(run, A, job_command(tmp_path), worker_id=f"w{i}") for i in range(2)]
    wait_for(lambda: status(run)["totals"]["done"] >= 8, what="some experiments done")
    killed_at = time.time()
    lose_the_vm(run, litestream)
    assert not run.db.exists()
    litestream = start_replicated_server(run, replica, port=port)
    for worker in workers:
        assert worker.wait(timeout=90) == 0
    experiments = with_store(run, lambda store: list(store.experiments()))
    assert len(experiments) == 30
    for experiment in experiments:
        assert experiment["status"] == st.DONE
        history = with_store(run, lambda store: store.attempts(experiment["key"]))
        assert [a["outcome"] for a in history].count(st.DONE) == 1
        # Every completed run of the command, the final one aside, is a re-run cause: its report
        # was acknowledged in the last sync window before the kill and did not reach the replica.
        finished = sorted((path.stat().st_mtime for path in (run.work / experiment["key"]).glob("*/result.json")))
        for earlier in finished[:-1]:
            assert earlier >= killed_at - SYNC_WINDOW, (experiment["key"], killed_at - earlier)
    os.kill(run.server_info()["pid"], signal.SIGTERM)
    assert litestream.wait(timeout=20) == 0


def test_bootstrap_pushes_the_database_and_a_fresh_run_directory_serves_it(run, tmp_path):
    replica = f"file://{tmp_path / 'replica'}"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(shape_rows(A, 3, sleep=0.1)))
    sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--set", f"replica_url={replica}",
        "--", *job_command(tmp_path))
    assert replica_backups(replica)
    wait_for(lambda: status(run)["totals"]["done"] == 3, what="the study done")
    sdm("stop", "--dir", run.path)
    fresh = type(run)(tmp_path / "fresh")
    fresh.path.mkdir()
    shutil.copy(run.token_file, fresh.token_file)
    litestream = start_replicated_server(fresh, replica)
    try:
        remote = sdm("status", "--dir", fresh.path, "--json").stdout
        assert '"done": 3' in remote
        from_replica = sdm("status", "--replica", replica, "--json").stdout
        assert '"done": 3' in from_replica
    finally:
        os.kill(fresh.server_info()["pid"], signal.SIGTERM)
        litestream.wait(timeout=20)


def test_a_replicated_server_has_stopped_once_litestream_has_ended_after_it(run, tmp_path, monkeypatch):
    from sdm_peer import run as run_module

    init(run, shape_rows(A, 3))
    litestream = start_replicated_server(run, f"file://{tmp_path / 'replica'}")
    server_pid = run.server_info()["pid"]
    assert replicator_of(server_pid) == litestream.pid
    awaited = []
    wait_gone = run_module.wait_gone
    monkeypatch.setattr(run_module, "wait_gone", lambda pids, timeout: awaited.append(pids) or wait_gone(pids, timeout))
    stop_server(run)
    # Litestream exits a moment after the server, once its last sync is done: a stop that
    # returned in that moment would leave the replica behind the database.
    assert awaited == [[server_pid, litestream.pid]]
    assert litestream.poll() == 0


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupted"])
def test_a_bad_replica_is_a_clear_error_never_an_empty_database(run, tmp_path, kind):
    replica_dir = tmp_path / "replica"
    if kind != "missing":
        replica_dir.mkdir()
    if kind == "corrupted":
        source = tmp_path / "source"
        source.mkdir()
        init(type(run)(source), shape_rows(A, 2))
        push(source / "sdm.db", f"file://{replica_dir}")
        for ltx in replica_dir.rglob("*.ltx"):
            ltx.write_bytes(b"\0garbage" * 4)
    replica = f"file://{replica_dir}"
    (run.token_file).write_text("secret\n")
    os.chmod(run.token_file, 0o600)
    served = sdm("serve", "--dir", run.path, "--port", 0, "--replicate", "--replica", replica, check=False, timeout=30)
    assert served.returncode == 2
    assert served.stderr.startswith("Error: ") and replica in served.stderr
    assert not run.db.exists()
    restored = sdm("restore", "--replica", replica, "--out", tmp_path / "out.db", check=False)
    assert restored.returncode == 2 and not (tmp_path / "out.db").exists()
    assert sdm("status", "--replica", replica, check=False).returncode == 2


@pytest.mark.parametrize("replicated", [False, True])
def test_alone_the_server_checkpoints_beside_its_writer_and_under_litestream_never(tmp_path, monkeypatch,
                                                                                  replicated):
    import asyncio
    import sqlite3

    from sdm_peer import server as server_module

    from .conftest import grid
    from .runs import make_run

    monkeypatch.setattr(server_module, "CHECKPOINT_SECONDS", 0.05)
    db, token = make_run(tmp_path / "run", grid([(2, 4)], 10))

    def started_in_the_file_alone():
        """STARTED experiments in the database file without its WAL: what checkpoints copied."""
        copy = tmp_path / "file-alone.db"
        shutil.copyfile(db, copy)
        with sqlite3.connect(copy) as conn:
            return conn.execute("SELECT COUNT(*) FROM experiments WHERE status = 'STARTED'").fetchone()[0]

    async def scenario():
        server = server_module.Server(db, token, port=0, lease_seconds=30, replicated=replicated)
        serving = asyncio.ensure_future(server.run())
        for _ in range(500):  # until it has opened the database
            if server._store is not None:
                break
            await asyncio.sleep(0.01)
        for n in range(3):
            await server._execute("claim", {"worker_id": f"w{n}", "cores": 2, "memory_gb": 4})
        seen = []
        for _ in range(100 if not replicated else 10):  # ten checkpoint periods under Litestream
            await asyncio.sleep(0.05)
            seen.append(started_in_the_file_alone())
            if seen[-1]:
                break
        autocheckpoint, busy_ms = (server._store.conn.execute(f"PRAGMA {pragma}").fetchone()[0]
                                   for pragma in ("wal_autocheckpoint", "busy_timeout"))
        server._stopping.set()
        await serving
        return seen[-1], autocheckpoint, busy_ms

    copied, autocheckpoint, busy_ms = asyncio.run(scenario())
    assert autocheckpoint == 0  # the writer's commits never checkpoint
    assert busy_ms >= 5000
    assert copied == (0 if replicated else 3)

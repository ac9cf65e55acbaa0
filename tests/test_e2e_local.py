"""The whole system on one machine, end to end: real server, workers, groups, signals.

Short leases (1-2 s); nobody acts between the start and the last result unless the test
is about what happens when something is killed."""

import json
import os
import signal
import time

from sdm_peer import states as st
from sdm_peer.run import bootstrap

from .runs import (all_done, attempts, experiments, free_port, init, job_command, processes_of, sdm, shape_rows,
                   start_server, start_worker, status, wait_for, with_store)

A, B, C = (1, 1), (1, 2), (2, 2)


def events(run, kind):
    return with_store(run, lambda store: store.events(kind=kind))


def started_experiment(run):
    """The key and working directory of an experiment whose command is running."""
    def find():
        for experiment in experiments(run):
            if experiment["status"] == st.STARTED:
                attempt = experiment["attempts"]
                workdir = run.work / experiment["key"] / f"attempt-{attempt}"
                if (workdir / "pid").exists():
                    return experiment["key"], workdir
        return None
    return wait_for(find, what="a running experiment")


def command_and_worker_pids(workdir):
    command, worker = map(int, (workdir / "pid").read_text().split())
    return command, worker


def assert_done_exactly_once(run):
    for experiment in experiments(run):
        assert experiment["status"] == st.DONE, experiment
        outcomes = [a["outcome"] for a in attempts(run, experiment["key"])]
        assert outcomes.count(st.DONE) == 1, (experiment["key"], outcomes)
        assert experiment["result"]["key"] == experiment["key"]


def test_three_configs_hand_off_to_completion_with_nobody_acting(run, tmp_path):
    rows = shape_rows(A, 4, 2, sleep=0.2) + shape_rows(B, 3, 2, sleep=0.2) + shape_rows(C, 2, 1, sleep=0.2)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2)
    bootstrap(run)
    wait_for(lambda: all_done(run), timeout=90, what="every config DONE")
    assert_done_exactly_once(run)
    handoffs = [(e["config"], e["worker"], e["detail"]["from"]) for e in events(run, "handoff")]
    assert [h[0] for h in handoffs] == ["c1-m1", "c1-m2", "c2-m2"]
    assert handoffs[0][1] == "bootstrap"
    # Each later group was provisioned by a worker of the group before it.
    assert handoffs[1][1].startswith("c1-m1-") and handoffs[1][2] == "c1-m1"
    assert handoffs[2][1].startswith("c1-m2-") and handoffs[2][2] == "c1-m2"
    provisioned = {e["config"]: e["worker"] for e in events(run, "group_provisioned")}
    assert provisioned == {config: worker for config, worker, _ in handoffs}
    # Every group removed itself once its config was done: nothing of the run is left running
    # but the server.
    wait_for(lambda: {e["config"] for e in events(run, "group_deleted")} == {"c1-m1", "c1-m2", "c2-m2"},
             what="all groups deleted")
    server_pid = run.server_info()["pid"]
    wait_for(lambda: [pid for pid, _ in processes_of(run.path) if pid != server_pid] == [],
             what="group processes gone")


def test_killed_worker_and_command_are_rerun_after_the_lease_lapses(run, tmp_path):
    init(run, shape_rows(A, 3, sleep=0.3, first_attempt_sleep=5), lease_seconds=1.5)
    server = start_server(run)
    workers = [start_worker(run, A, job_command(tmp_path), worker_id=f"w{i}") for i in range(2)]
    key, workdir = started_experiment(run)
    command_pid, worker_pid = command_and_worker_pids(workdir)
    os.kill(worker_pid, signal.SIGKILL)
    os.kill(command_pid, signal.SIGKILL)
    survivor = next(w for w in workers if w.pid != worker_pid)
    assert survivor.wait(timeout=60) == 0  # finishes the config, the killed one's experiment included
    assert_done_exactly_once(run)
    outcomes = [a["outcome"] for a in attempts(run, key)]
    assert outcomes[0] == st.EXPIRED and outcomes[-1] == st.DONE
    server.terminate()
    server.wait(timeout=15)


def test_sigterm_gives_the_experiment_back_at_once_without_counting_a_failure(run, tmp_path):
    init(run, shape_rows(A, 1, sleep=0.2, first_attempt_sleep=30), lease_seconds=60)
    server = start_server(run)
    first = start_worker(run, A, job_command(tmp_path), worker_id="first")
    key, workdir = started_experiment(run)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 143
    assert (workdir / "got-sigterm").exists()
    experiment = experiments(run)[0]
    # INTERRUPTED at once, not after a 60 s lease lapses.
    assert experiment["status"] == st.INTERRUPTED and experiment["interruptions"] == 1
    assert experiment["failures"] == 0
    second = start_worker(run, A, job_command(tmp_path), worker_id="second")
    assert second.wait(timeout=30) == 0
    history = attempts(run, key)
    assert [(a["worker"], a["outcome"]) for a in history] == [("first", st.INTERRUPTED), ("second", st.DONE)]
    server.terminate()
    server.wait(timeout=15)


def test_sigterm_to_a_worker_whose_command_ignores_it_still_exits_within_20s(run, tmp_path):
    init(run, shape_rows(A, 1, sleep=60, ignore_term=True), lease_seconds=60)
    server = start_server(run)
    worker = start_worker(run, A, job_command(tmp_path))
    _, workdir = started_experiment(run)
    command_pid, _ = command_and_worker_pids(workdir)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 143  # the bound is the promise: out within 20 s
    wait_for(lambda: not os.path.exists(f"/proc/{command_pid}/stat") or
             open(f"/proc/{command_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=5,
             what="the command killed")
    assert experiments(run)[0]["status"] == st.INTERRUPTED
    server.terminate()
    server.wait(timeout=15)


def test_server_killed_and_restarted_mid_run_loses_nothing(run, tmp_path):
    init(run, shape_rows(A, 16, sleep=0.3), lease_seconds=2)
    server = start_server(run)
    port = run.server_info()["port"]
    workers = [start_worker(run, A, job_command(tmp_path), worker_id=f"w{i}") for i in range(2)]
    wait_for(lambda: status(run)["totals"]["done"] >= 3, what="some experiments done")
    server.kill()
    server.wait()
    # Down until every held lease has lapsed: the workers' renewals fail meanwhile.
    expiry = with_store(run, lambda store: store.conn.execute(
        "SELECT MAX(lease_expires_at) FROM experiments WHERE status = ?", (st.STARTED,)).fetchone()[0])
    wait_for(lambda: time.time() > (expiry or 0), what="every held lease lapsed")
    server = start_server(run, port=port)
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    assert_done_exactly_once(run)
    assert status(run)["totals"]["done"] == 16
    server.terminate()
    assert server.wait(timeout=15) == 0


def test_report_waits_for_an_unreachable_server_and_is_not_lost(run, tmp_path):
    init(run, shape_rows(A, 1, sleep=2), lease_seconds=30)
    server = start_server(run)
    port = run.server_info()["port"]
    worker = start_worker(run, A, job_command(tmp_path))
    key, workdir = started_experiment(run)
    server.kill()
    server.wait()
    wait_for(lambda: (workdir / "result.json").exists(), what="the command to finish while the server is away")
    wait_for(lambda: any("complete: " in log.read_text() and "still trying" in log.read_text()
                         for log in run.path.glob("worker-*.log")), what="the worker retrying its report")
    server = start_server(run, port=port)
    assert worker.wait(timeout=60) == 0
    experiment = experiments(run)[0]
    assert experiment["status"] == st.DONE and experiment["result"]["key"] == key
    assert [a["outcome"] for a in attempts(run, key)] == [st.DONE]
    server.terminate()
    server.wait(timeout=15)


def test_failing_command_is_retried_then_failed_and_the_group_still_hands_off(run, tmp_path):
    rows = shape_rows(A, 2, 2, sleep=0.1) + [{"cores": 1, "memory_gb": 1, "key": "bad", "exit": 1}] \
        + shape_rows(B, 2, 1, sleep=0.1)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2, max_failures=3)
    bootstrap(run)
    wait_for(lambda: all_done(run), timeout=90, what="every config DONE")
    bad = next(e for e in experiments(run) if e["key"] == "bad")
    assert bad["status"] == st.FAILED and bad["failures"] == 3 and "max_failures" in bad["failed_reason"]
    history = attempts(run, "bad")
    assert [(a["outcome"], a["exit_code"]) for a in history] == [(st.ERROR, 1)] * 3
    assert all("failing on purpose" in a["error"] for a in history)
    assert [e["config"] for e in events(run, "handoff")] == ["c1-m1", "c1-m2"]
    assert status(run)["totals"]["done"] == 4


def test_provisioner_killed_before_reporting_is_taken_over_and_the_run_completes(run, tmp_path):
    # c1-m2 runs longer than the provisioning lease: the takeover happens while it runs.
    rows = shape_rows(A, 2, 2, sleep=0.1) + shape_rows(B, 2, 1, sleep=3)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2, provision_lease_seconds=1)
    marker = tmp_path / "failpoint-fired"
    os.environ["SDM_FAILPOINTS"] = f"after_create_group={marker}"
    try:
        bootstrap(run)
    finally:
        del os.environ["SDM_FAILPOINTS"]
    wait_for(lambda: all_done(run), timeout=90, what="every config DONE")
    assert marker.exists()  # the provisioner of c1-m2 died between create_group and provisioned
    handoff = events(run, "handoff")[1]
    takeover = wait_for(lambda: events(run, "provision_takeover"), what="a takeover")
    assert takeover[0]["config"] == "c1-m2" and takeover[0]["worker"] != handoff["worker"]
    provisioned = events(run, "group_provisioned")
    assert [e["config"] for e in provisioned] == ["c1-m1", "c1-m2"]
    assert provisioned[1]["worker"] == takeover[0]["worker"]
    wait_for(lambda: {e["config"] for e in events(run, "group_deleted")} == {"c1-m1", "c1-m2"},
             what="both groups deleted")
    assert_done_exactly_once(run)


def test_group_supervisor_replaces_a_killed_worker(run, tmp_path):
    rows = shape_rows(A, 4, 2, sleep=0.2, first_attempt_sleep=3)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=1.5)
    bootstrap(run)
    workers_file = run.groups / "c1-m1" / "workers.json"
    pids = wait_for(lambda: workers_file.exists() and len(json.loads(workers_file.read_text())) == 2
                    and json.loads(workers_file.read_text()), what="two workers")
    slot, victim = next(iter(pids.items()))
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: json.loads(workers_file.read_text()).get(slot) not in (None, victim)
                        and json.loads(workers_file.read_text())[slot], what="a replacement worker")
    assert os.path.exists(f"/proc/{replaced}")
    wait_for(lambda: all_done(run), timeout=60, what="the config DONE")
    assert status(run)["totals"]["done"] == 4


def test_bootstrap_again_restarts_a_dead_server_and_changes_nothing_on_a_live_run(run, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(shape_rows(A, 2, 1, sleep=30)))
    command = job_command(tmp_path)
    sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--lease-seconds", 10, "--", *command)
    first = run.server_info()
    wait_for(lambda: status(run)["totals"]["started"] == 1, what="a claim")
    again = sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--", *command)
    assert "0 experiments added" in again.stdout and run.server_info() == first
    assert len(events(run, "handoff")) == 1
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{first['pid']}/stat") or
             open(f"/proc/{first['pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", what="server dead")
    sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--", *command)
    second = run.server_info()
    assert second["pid"] != first["pid"] and second["port"] == first["port"]
    assert json.loads(sdm("status", "--dir", run.path, "--json").stdout)["totals"]["started"] == 1
    sdm("stop", "--dir", run.path)
    assert processes_of(run.path) == []
    # The stopped worker gave its lease back.
    assert experiments(run)[0]["status"] == st.INTERRUPTED


def test_bootstrap_can_start_the_dashboard_with_the_server(run, tmp_path):
    import urllib.request

    http_port = free_port()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(shape_rows(A, 2, 1, sleep=0.1)))
    started = sdm("bootstrap", "--plan", plan, "--provider", "local", "--dir", run.path, "--http-port", http_port,
                  "--", *job_command(tmp_path))
    assert f"http://127.0.0.1:{http_port}/" in started.stdout
    wait_for(lambda: all_done(run), what="the study done")
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/status.json",
                                     headers={"Authorization": f"Bearer {run.token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["totals"]["done"] == 2

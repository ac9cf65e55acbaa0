"""The worker agent against a real server: the command's environment contract, results,
lost leases, waiting for work and keeping a provisioning lease while it creates a group."""

import json
import os
import signal
import time

import pytest

from sdm_peer import states as st
from sdm_peer.client import Client
from sdm_peer.errors import SdmPeerError
from sdm_peer.providers.base import Provider
from sdm_peer.worker import MAX_RESULT_BYTES, Worker, read_result

from .runs import (attempts, experiments, init, job_command, shape_rows, start_server, start_worker, wait_for,
                   with_store)

A = (1, 1)


@pytest.fixture
def served(run):
    servers = []

    def serve(rows, **settings):
        init(run, rows, **settings)
        servers.append(start_server(run))
        return run

    yield serve
    for server in servers:
        server.terminate()
        server.wait(timeout=15)


def test_command_gets_the_environment_contract_in_a_fresh_directory_per_attempt(served, tmp_path):
    run = served([{"cores": 1, "memory_gb": 1, "key": "k/1", "alpha": 0.5, "name": "x; rm -rf /"}])
    worker = start_worker(run, A, job_command(tmp_path))
    assert worker.wait(timeout=30) == 0
    experiment = experiments(run)[0]
    env = experiment["result"]["env"]
    assert set(env) >= {"SDM_EXPERIMENT_KEY", "SDM_PARAMS", "SDM_PARAMS_FILE", "SDM_RESULT_FILE", "SDM_ATTEMPT",
                        "SDM_WORKDIR"}
    assert env["SDM_EXPERIMENT_KEY"] == "k/1" and env["SDM_ATTEMPT"] == "1"
    assert json.loads(env["SDM_PARAMS"]) == {"alpha": 0.5, "name": "x; rm -rf /"}
    workdir = run.work / "k_1" / "attempt-1"
    assert env["SDM_WORKDIR"] == str(workdir)
    assert json.loads((workdir / "params.json").read_text()) == {"alpha": 0.5, "name": "x; rm -rf /"}
    assert (workdir / "stdout.log").exists() and (workdir / "stderr.log").exists()
    assert experiment["status"] == st.DONE and experiment["wall_seconds"] > 0


@pytest.mark.parametrize("params, message", [
    ({"raw_result": "[1, 2]"}, "must hold a JSON object"),
    ({"raw_result": "{not json"}, "not valid JSON"),
    ({"raw_result": '{"loss": NaN}'}, "NaN is not a JSON number"),
    ({"result_bytes": MAX_RESULT_BYTES}, "at most"),
])
def test_a_bad_result_file_is_an_error_with_a_clear_message(served, tmp_path, params, message):
    run = served([{"cores": 1, "memory_gb": 1, "key": "k", **params}], max_failures=1)
    worker = start_worker(run, A, job_command(tmp_path))
    assert worker.wait(timeout=30) == 0
    experiment = experiments(run)[0]
    assert experiment["status"] == st.FAILED
    attempt = attempts(run, "k")[0]
    assert attempt["outcome"] == st.ERROR and attempt["exit_code"] == 0 and message in attempt["error"]


def test_no_result_file_is_an_empty_result(tmp_path):
    assert read_result(tmp_path / "absent.json") == {}
    (tmp_path / "r.json").write_text('{"a": 1}')
    assert read_result(tmp_path / "r.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("3")
    with pytest.raises(SdmPeerError, match="JSON object"):
        read_result(tmp_path / "bad.json")


def test_lease_lost_stops_the_command_and_the_worker_goes_on(served, tmp_path):
    run = served(shape_rows(A, 1, sleep=0.1, first_attempt_sleep=60), lease_seconds=1.5)
    worker = start_worker(run, A, job_command(tmp_path), worker_id="w")
    workdir = run.work / experiments(run)[0]["key"] / "attempt-1"
    wait_for(lambda: (workdir / "pid").exists(), what="the command running")
    # The lease is taken away behind the worker's back (as a takeover after a partition would).
    with_store(run, lambda store: store.release(worker_id="w", reason="test", now=time.time()))
    wait_for(lambda: (workdir / "got-sigterm").exists(), timeout=10, what="the command to get SIGTERM")
    assert worker.wait(timeout=30) == 0  # it claimed the experiment again and finished it
    assert [a["outcome"] for a in attempts(run)] == [st.INTERRUPTED, st.DONE]


def test_idle_worker_waits_while_leases_are_live_and_exits_when_the_config_is_done(served, tmp_path):
    run = served(shape_rows(A, 1, sleep=2), lease_seconds=5)
    busy = start_worker(run, A, job_command(tmp_path), worker_id="busy")
    wait_for(lambda: experiments(run)[0]["status"] == st.STARTED, what="a claim")
    idle = start_worker(run, A, job_command(tmp_path), worker_id="idle")
    assert busy.wait(timeout=30) == 0
    assert idle.wait(timeout=30) == 0
    [attempt] = attempts(run)
    assert attempt["worker"] == "busy"
    # The idle one waited while the lease was live: it was still asking after the experiment was done.
    last_seen = with_store(run, lambda store: store.conn.execute(
        "SELECT last_seen FROM workers WHERE id = 'idle'").fetchone()[0])
    assert last_seen >= attempt["ended_at"]


def test_worker_of_an_unknown_shape_exits_with_a_clear_error(served, tmp_path):
    run = served(shape_rows(A, 1))
    worker = start_worker(run, (3, 7), job_command(tmp_path), worker_id="odd")
    assert worker.wait(timeout=30) == 2
    log = (run.path / "worker-odd.log").read_text()
    assert "no config of this run has the shape 3 cores x 7 GB" in log


def test_worker_without_a_command_anywhere_is_refused(served):
    run = served(shape_rows(A, 1))
    worker = start_worker(run, A, worker_id="nocmd")
    assert worker.wait(timeout=30) == 2
    assert "no command to run" in (run.path / "worker-nocmd.log").read_text()
    assert experiments(run)[0]["status"] == st.NOT_STARTED


def test_worker_uses_the_runs_command_setting(served, tmp_path):
    run = served(shape_rows(A, 2), command=job_command(tmp_path))
    assert start_worker(run, A).wait(timeout=30) == 0
    assert all(e["status"] == st.DONE for e in experiments(run))


def test_command_that_cannot_start_is_an_error(served, tmp_path):
    run = served(shape_rows(A, 1), max_failures=1)
    assert start_worker(run, A, [str(tmp_path / "no-such-program")]).wait(timeout=30) == 0
    attempt = attempts(run)[0]
    assert attempt["outcome"] == st.ERROR and "cannot start" in attempt["error"]
    assert os.path.isdir(run.work)


class SlowProvider(Provider):
    """A provider whose create_group outlasts the provisioning lease period (as creating a cloud
    group can): while it runs, another party tries to take the provisioning over."""

    def __init__(self, run, period):
        self.run, self.period, self.takeovers = run, period, []

    def create_group(self, spec):
        lapses_at = time.time() + self.period  # unless renewed
        wait_for(lambda: time.time() > lapses_at + self.period / 2, timeout=60,
                 what="a full provisioning lease period and more to pass")
        intruder = Client.for_run_dir(self.run)
        try:
            taken = intruder.call("acquire_provisioning", owner="intruder")["provision"]
            self.takeovers.append(taken)
            if taken:  # the lease had lapsed: finish the hand-off, so the worker can end and the test fail
                intruder.call("provisioned", provision_token=taken["provision_token"], worker_id="intruder")
        finally:
            intruder.close()


def test_a_provisioning_lease_is_kept_while_a_slow_create_group_runs(served, tmp_path):
    period = 1.5  # seconds of the provisioning lease; create_group takes twice as long
    run = served(shape_rows(A, 1) + shape_rows((2, 2), 1), provider="local", command=job_command(tmp_path),
                 provision_lease_seconds=period)
    provider = SlowProvider(run, period)
    client = Client.for_run_dir(run)
    worker = Worker(client, None, worker_id="w1", cores=A[0], memory_gb=A[1], work_root=run.work,
                    provider_for=lambda settings: provider)
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        assert worker.run() == 0  # finishes c1-m1, provisions c2-m2, exits
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        client.close()
    assert provider.takeovers == [None]  # the lease was still held, past its first period
    events = with_store(run, lambda store: store.events())
    assert [(e["kind"], e["config"], e["worker"]) for e in events if e["kind"] in ("group_provisioned",
                                                                                 "provision_takeover")] == \
        [("group_provisioned", "c2-m2", "w1")]

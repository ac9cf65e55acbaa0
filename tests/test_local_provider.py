"""The local provider's `server` setting: workers reach the server at HOST:PORT (a proxy, say)
with the run's token file instead of reading the run directory's server.json."""

import json

from sdm_peer.providers.base import provider_for
from sdm_peer.providers.local import LocalProvider, Supervisor
from sdm_peer.run import bootstrap

from .runs import all_done, free_port, init, job_command, shape_rows, start_server, wait_for, with_store


def group_record(run, name, **fields):
    directory = run.groups / name
    directory.mkdir(parents=True)
    record = {"config": name, "cores": 1, "memory_gb": 2, "size": 1, "created_at": 0.0, "deleted": False,
              "supervisor_pid": None, **fields}
    (directory / "group.json").write_text(json.dumps(record))
    return directory


def test_provider_for_passes_the_server_setting_to_the_local_provider(tmp_path):
    provider = provider_for({"provider": "local", "server": "127.0.0.1:9999"}, tmp_path)
    assert isinstance(provider, LocalProvider) and provider.server == "127.0.0.1:9999"
    assert provider_for({"provider": "local"}, tmp_path).server is None


def test_supervisor_worker_command_uses_the_server_and_token_file_when_set(run):
    supervisor = Supervisor(group_record(run, "c1-m2", server="127.0.0.1:9999"))
    supervisor.generation[0] = 1
    command = supervisor.worker_command(0)
    assert command[command.index("--server") + 1] == "127.0.0.1:9999"
    assert command[command.index("--token-file") + 1] == str(run.token_file)
    assert "--dir" not in command


def test_supervisor_worker_command_uses_the_run_directory_without_a_server(run):
    # A group.json written before the setting existed has no "server" field at all.
    supervisor = Supervisor(group_record(run, "c1-m2"))
    supervisor.generation[0] = 1
    command = supervisor.worker_command(0)
    assert command[command.index("--dir") + 1] == str(run.path)
    assert "--server" not in command


def test_workers_reach_the_server_through_the_server_setting_not_server_json(run, tmp_path):
    port = free_port()
    rows = shape_rows((1, 1), 2, 1, sleep=1.0) + shape_rows((1, 2), 2, 1, sleep=0.1)
    init(run, rows, provider="local", command=job_command(tmp_path), lease_seconds=2,
         server=f"127.0.0.1:{port}")
    server = start_server(run, port=port)
    try:
        bootstrap(run)
        assert json.loads((run.groups / "c1-m1" / "group.json").read_text())["server"] == f"127.0.0.1:{port}"
        # From now on server.json names a port nobody listens on: the second group's workers
        # can only find the server through the setting.
        info = run.server_info()
        run.write_server_info(info["host"], free_port(), info["pid"])
        assert with_store(run, lambda store: store.status(now=0))["totals"]["done"] == 0
        wait_for(lambda: all_done(run), timeout=60, what="every config DONE")
        assert json.loads((run.groups / "c1-m2" / "group.json").read_text())["server"] == f"127.0.0.1:{port}"
        experiments = with_store(run, lambda store: list(store.experiments()))
        assert [e["status"] for e in experiments] == ["DONE"] * 4
        # The workers kept the run's directory for their working directories.
        assert all((run.work / e["key"]).is_dir() for e in experiments)
    finally:
        server.terminate()
        server.wait(timeout=15)

"""One provider contract (DESIGN §6), run against every registered provider: `local` (processes on
this machine) and `gce` (the fake Compute Engine through the real client library). create_group,
delete_group and leave_group are idempotent: an existing group is success, a missing one (or a
worker already gone) is success; check_run refuses a run it cannot serve before anything exists.

A stub provider registered from the test drives `bootstrap` and `group up|down` through the real
CLI: adding a provider is its class and one registry line."""

import pytest
from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.errors import BadInput
from sdm_peer.processes import alive
from sdm_peer.providers import base
from sdm_peer.providers.base import GroupSpec, Provider
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.providers.local import LocalProvider

from .fake_gce import FakeCompute
from .runs import init, job_command, plan_file, shape_rows, start_server, wait_for

SPEC = GroupSpec("c1-m1", 1, 1, 2)


class Backend:
    """A provider, how to see its group (`group()` is None when there is none, else something
    that changes if the group were made again), its workers' ids, and a settings it needs."""

    def __init__(self, provider, group, workers, settings):
        self.provider, self.group, self.workers, self.settings = provider, group, workers, settings


class ProviderContract:
    provider_name = None  # the registry name of the provider the backend gives

    def test_the_backend_is_the_registered_provider(self, backend):
        assert type(backend.provider) is base.provider_class(self.provider_name)

    def test_create_group_makes_the_group(self, backend):
        assert backend.group() is None
        backend.provider.create_group(SPEC)
        assert backend.group() is not None

    def test_create_group_twice_keeps_the_existing_group(self, backend):
        backend.provider.create_group(SPEC)
        first = backend.group()
        backend.provider.create_group(SPEC)
        assert backend.group() == first

    def test_delete_group_removes_it_and_twice_is_success(self, backend):
        backend.provider.create_group(SPEC)
        backend.provider.delete_group(GroupSpec("c1-m1"))
        assert backend.group() is None
        backend.provider.delete_group(GroupSpec("c1-m1"))
        assert backend.group() is None

    def test_delete_of_a_group_never_made_is_success(self, backend):
        backend.provider.delete_group(GroupSpec("c1-m1"))
        assert backend.group() is None

    def test_a_deleted_group_can_be_made_again(self, backend):
        backend.provider.create_group(SPEC)
        backend.provider.delete_group(GroupSpec("c1-m1"))
        backend.provider.create_group(SPEC)
        assert backend.group() is not None

    def test_leave_group_twice_keeps_the_group_of_the_others(self, backend):
        backend.provider.create_group(SPEC)
        leaving = wait_for(backend.workers, what="the group's workers")[0]
        backend.provider.leave_group(GroupSpec("c1-m1"), leaving)
        backend.provider.leave_group(GroupSpec("c1-m1"), leaving)  # the worker is gone already
        assert backend.group() is not None

    def test_leave_a_group_that_is_gone_is_success(self, backend):
        backend.provider.leave_group(GroupSpec("c1-m1"), "a-worker")
        backend.provider.create_group(SPEC)
        backend.provider.delete_group(GroupSpec("c1-m1"))
        backend.provider.leave_group(GroupSpec("c1-m1"), "a-worker")
        assert backend.group() is None

    def test_check_run_accepts_a_servable_run(self, backend):
        type(backend.provider).check_run(backend.settings, [(1, 1), (2, 4)])


def test_every_registered_provider_runs_the_contract():
    assert {suite.provider_name for suite in ProviderContract.__subclasses__()} == set(base.names())


class TestLocalProvider(ProviderContract):
    provider_name = "local"

    @pytest.fixture
    def backend(self, run, tmp_path):
        init(run, shape_rows((1, 1), 2, sleep=30), command=job_command(tmp_path), lease_seconds=60)
        server = start_server(run)
        provider = LocalProvider(run)

        def group():
            record = provider.group("c1-m1")
            live = record and not record["deleted"] and alive(record["supervisor_pid"])
            return record["supervisor_pid"] if live else None
        yield Backend(provider, group, lambda: provider.worker_pids("c1-m1"), {"provider": "local"})
        provider.delete_group(GroupSpec("c1-m1"))
        server.terminate()
        server.wait(timeout=15)


class TestGceProvider(ProviderContract):
    provider_name = "gce"

    @pytest.fixture
    def backend(self, monkeypatch):
        monkeypatch.setenv("NO_GCE_CHECK", "true")
        fake = FakeCompute().start()
        api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address)
        settings = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "contract"}

        def group():
            return id(fake.groups["sdm-contract-c1-m1"]) if "sdm-contract-c1-m1" in fake.groups else None

        def workers():
            return fake.members("sdm-contract-c1-m1") if "sdm-contract-c1-m1" in fake.groups else []
        yield Backend(GceProvider(settings, "token", api=api), group, workers, settings)
        fake.stop()

    def test_check_run_refuses_a_shape_no_machine_type_has(self, backend):
        with pytest.raises(BadInput, match="cannot be served"):
            GceProvider.check_run(backend.settings, [(1, 1), (3, 0.1)])


# ---------------------------------------------------------------- a provider added from outside

class StubProvider(Provider):
    """A provider that records what it is asked and starts nothing: its "groups" are workers
    started by the test. It refuses configs of more than 8 cores."""

    groups = {}

    def __init__(self, run_dir):
        self.run_dir = run_dir

    @classmethod
    def for_run(cls, settings, run_dir, token):
        return cls(run_dir)

    @classmethod
    def check_run(cls, settings, shapes):
        if any(cores > 8 for cores, _ in shapes):
            raise BadInput("stub: at most 8 cores")

    def create_group(self, spec):
        self.groups.setdefault(spec.name, spec)

    def delete_group(self, spec):
        self.groups.pop(spec.name, None)

    def leave_group(self, spec, worker_id):
        pass


@pytest.fixture
def stub():
    previous = base.register("stub", StubProvider)
    StubProvider.groups.clear()
    yield StubProvider
    if previous is None:
        del base.REGISTRY["stub"]


def test_a_provider_registered_from_outside_runs_bootstrap_and_group_up_down(stub, run, tmp_path):
    plan = plan_file(tmp_path, shape_rows((1, 1), 2) + shape_rows((2, 2), 1))
    cli = CliRunner()
    started = cli.invoke(main, ["bootstrap", "--plan", plan, "--provider", "stub", "--dir", run.path, "--",
                                *job_command(tmp_path)])
    assert started.exit_code == 0, started.output
    assert "3 experiments added; server on 127.0.0.1:" in started.output
    assert stub.groups == {"c1-m1": GroupSpec("c1-m1", 1, 1, 1)}  # the first config's group, from bootstrap
    down = cli.invoke(main, ["group", "down", "c1-m1", "--dir", run.path])
    assert down.exit_code == 0 and stub.groups == {}
    up = cli.invoke(main, ["group", "up", "c2-m2", "--dir", run.path])
    assert up.exit_code == 0 and "group of c2-m2 is up (1 workers)" in up.output
    assert stub.groups == {"c2-m2": GroupSpec("c2-m2", 2, 2, 1)}
    server_pid = run.server_info()["pid"]
    stopped = cli.invoke(main, ["stop", "--dir", run.path])
    assert stopped.exit_code == 0 and stub.groups == {} and not alive(server_pid)


def test_a_registered_provider_refuses_an_unservable_run_before_anything_is_written(stub, run, tmp_path):
    plan = plan_file(tmp_path, shape_rows((16, 64), 1))
    refused = CliRunner().invoke(main, ["bootstrap", "--plan", plan, "--provider", "stub", "--dir", run.path,
                                        "--", "true"])
    assert refused.exit_code == 2 and "stub: at most 8 cores" in refused.output
    assert not run.db.exists() and stub.groups == {}


def test_a_run_served_here_refuses_the_flags_of_another_providers_bootstrap(stub, run, tmp_path):
    plan = plan_file(tmp_path, shape_rows((1, 1), 1))
    refused = CliRunner().invoke(main, ["bootstrap", "--plan", plan, "--provider", "stub", "--dir", run.path,
                                        "--zone", "us-central1-a", "--", "true"])
    assert refused.exit_code == 2
    assert "--project, --zone, --bucket and --dry-run are for --provider gce" in refused.output

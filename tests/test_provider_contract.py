"""One provider contract (DESIGN §6), run against every backend: `local` (processes on this
machine) and `gce` (the fake Compute Engine through the real client library). create_group and
delete_group are idempotent: an existing group is success, a missing one is success."""

import pytest

from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce_api import ComputeApi
from sdm_peer.providers.local import LocalProvider, _alive

from .fake_gce import FakeCompute
from .runs import init, job_command, shape_rows, start_server

CONFIG = {"config": "c1-m1", "cores": 1, "memory_gb": 1, "group_size": 2}


class Backend:
    """A provider, and how to see its group: `group()` is None when there is none, else
    something that changes if the group were made again."""

    def __init__(self, provider, group):
        self.provider, self.group = provider, group


class ProviderContract:
    def test_create_group_makes_the_group(self, backend):
        assert backend.group() is None
        backend.provider.create_group(CONFIG)
        assert backend.group() is not None

    def test_create_group_twice_keeps_the_existing_group(self, backend):
        backend.provider.create_group(CONFIG)
        first = backend.group()
        backend.provider.create_group(CONFIG)
        assert backend.group() == first

    def test_delete_group_removes_it_and_twice_is_success(self, backend):
        backend.provider.create_group(CONFIG)
        backend.provider.delete_group({"config": "c1-m1"})
        assert backend.group() is None
        backend.provider.delete_group({"config": "c1-m1"})
        assert backend.group() is None

    def test_delete_of_a_group_never_made_is_success(self, backend):
        backend.provider.delete_group({"config": "c1-m1"})
        assert backend.group() is None

    def test_a_deleted_group_can_be_made_again(self, backend):
        backend.provider.create_group(CONFIG)
        backend.provider.delete_group({"config": "c1-m1"})
        backend.provider.create_group(CONFIG)
        assert backend.group() is not None


class TestLocalProvider(ProviderContract):
    @pytest.fixture
    def backend(self, run, tmp_path):
        init(run, shape_rows((1, 1), 2, sleep=30), command=job_command(tmp_path), lease_seconds=60)
        server = start_server(run)
        provider = LocalProvider(run)

        def group():
            record = provider.group("c1-m1")
            alive = record and not record["deleted"] and _alive(record["supervisor_pid"])
            return record["supervisor_pid"] if alive else None
        yield Backend(provider, group)
        provider.delete_group({"config": "c1-m1"})
        server.terminate()
        server.wait(timeout=15)


class TestGceProvider(ProviderContract):
    @pytest.fixture
    def backend(self, monkeypatch):
        monkeypatch.setenv("NO_GCE_CHECK", "true")
        fake = FakeCompute().start()
        api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address)
        settings = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "contract"}
        yield Backend(GceProvider(settings, "token", api=api),
                      lambda: id(fake.groups["sdm-contract-c1-m1"]) if "sdm-contract-c1-m1" in fake.groups else None)
        fake.stop()

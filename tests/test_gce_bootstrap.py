"""The parts of a gce bootstrap that work from outside the VPC, where the database VM's
server cannot be reached: readiness seen on the replica, provisioning from the replica's state."""

import pytest

from sdm_peer import replication
from sdm_peer.client import Client
from sdm_peer.errors import SdmPeerError
from sdm_peer.providers.gce.bootstrap import _newest_txid, provision_from_replica, wait_until_serving

from .runs import free_port, init, shape_rows


class RecordingProvider:
    def __init__(self):
        self.created = []

    def create_group(self, spec):
        self.created.append(spec.name)


@pytest.fixture
def unreachable():
    client = Client(("127.0.0.1", free_port()), "token", retry_seconds=0.2)
    yield client
    client.close()


def test_a_change_on_the_replica_after_the_push_means_the_server_runs(run, tmp_path, unreachable):
    replica = f"file://{tmp_path}/replica"
    init(run, shape_rows((2, 4), 1))
    replication.push(run.db, replica)
    pushed = _newest_txid(replica)
    init(run, shape_rows((2, 4), 2))  # a write, as the server's start makes one
    replication.push(run.db, replica)
    assert wait_until_serving(unreachable, replica, pushed, echo=lambda _: None, timeout=10) is False


def test_no_sign_of_the_server_is_an_error_after_the_timeout(run, tmp_path, unreachable):
    replica = f"file://{tmp_path}/replica"
    init(run, shape_rows((2, 4), 1))
    replication.push(run.db, replica)
    with pytest.raises(SdmPeerError, match="did not serve within"):
        wait_until_serving(unreachable, replica, _newest_txid(replica), echo=lambda _: None, timeout=0.5)


def test_without_the_server_the_first_waiting_config_gets_its_group(run, tmp_path):
    replica = f"file://{tmp_path}/replica"
    init(run, shape_rows((2, 4), 1) + shape_rows((2, 8), 1), provider="gce", project="my-proj",
         zone="us-central1-a", run_name="study1")
    replication.push(run.db, replica)
    provider = RecordingProvider()
    provision_from_replica(replica, provider, echo=lambda _: None)
    assert provider.created == ["c2-m4"]

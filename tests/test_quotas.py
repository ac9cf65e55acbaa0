"""The account's quotas, read and respected (issue 16, DESIGN §8): `bootstrap --provider gce` reads
the region's and the project's quotas from the fake Compute Engine, sets max_vcpus from what they
leave free, and refuses up front a config whose one VM can never fit them."""

import json

import pytest
from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.errors import BadInput
from sdm_peer.plan import read_plan
from sdm_peer.providers.base import GroupSpec
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi
from sdm_peer.providers.gce.bootstrap import fit_quotas
from sdm_peer.providers.gce.quotas import Quota, fit
from sdm_peer.run import init_run

from .fake_gce import FakeCompute
from .runs import plan_file, shape_rows

SETTINGS = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "q",
            "replica_url": "gs://bucket/q"}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    server = FakeCompute(retry_delay=0.05).start()
    monkeypatch.setenv("SDM_GCE_API_ENDPOINT", server.address)
    yield server
    server.stop()


def plan(tmp_path, *shapes):
    return plan_file(tmp_path, [row for shape in shapes for row in shape_rows(shape, 2)])


def bootstrap(tmp_path, plan_path, *flags):
    return CliRunner().invoke(main, ["bootstrap", "--provider", "gce", "--dir", str(tmp_path / "run"), "--plan",
                                     str(plan_path), "--project", "my-proj", "--zone", "us-central1-a", "--bucket",
                                     "bucket", *flags, "--", "true"])


def test_a_free_trial_refuses_the_shapes_that_can_never_run_with_exit_2_and_creates_nothing(fake, tmp_path):
    fake.quotas["CPUS"] = 8.0  # PREEMPTIBLE_CPUS 0, as in a new project: spot VMs count on CPUS
    refused = bootstrap(tmp_path, plan(tmp_path, (6, 24), (8, 32), (16, 64)))
    assert refused.exit_code == 2, refused.output
    assert "config c16-m64 needs 16 vCPUs; quota CPUS in region us-central1 is 8, 2 of it for the database VM" \
        in refused.output
    assert "config c8-m32 needs 8 vCPUs" in refused.output and "c6-m24" not in refused.output
    assert not (tmp_path / "run" / "sdm.db").exists()
    assert fake.calls("GET", "regions/us-central1$") and fake.calls("GET", "projects/my-proj$")
    assert not fake.calls("POST") and not fake.calls("DELETE")
    assert fake.templates == fake.groups == fake.instances == fake.firewalls == {}


def test_max_vcpus_is_what_the_quotas_leave_free_and_status_shows_it(fake, tmp_path):
    fake.quotas.update(CPUS=8.0, N2_CPUS=24.0)
    plan_path = plan(tmp_path, (2, 8), (4, 16))
    db = tmp_path / "sdm.db"
    settings = fit_quotas(db, read_plan(plan_path), SETTINGS, echo=lambda _: None)
    assert settings["max_vcpus"] == 6  # CPUS 8, less the database VM's 2
    init_run(db, plan_path, settings)
    shown = CliRunner().invoke(main, ["status", "--db", str(db), "--json"])
    assert json.loads(shown.output)["vcpus"]["limit"] == 6
    # Given, or stored by an earlier bootstrap, it stays.
    assert fit_quotas(db, read_plan(plan_path), {**SETTINGS, "max_vcpus": 4}, echo=print)["max_vcpus"] == 4
    assert "max_vcpus" not in fit_quotas(db, read_plan(plan_path), SETTINGS, echo=print)


def test_usage_elsewhere_lowers_max_vcpus_but_never_below_the_biggest_shape(fake, tmp_path):
    fake.quotas["CPUS"] = 12.0
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address)
    GceProvider({**SETTINGS, "server": "10.0.0.2:7787"}, "t", api=api).create_group(GroupSpec("c4-m16", 4, 16, 1))
    quotas = api.quotas("us-central1")
    assert (quotas["CPUS"].usage, quotas["N2_CPUS"].usage, quotas["CPUS_ALL_REGIONS"].usage) == (4, 4, 4)
    assert quotas["INSTANCE_TEMPLATES"].usage == quotas["INSTANCE_GROUP_MANAGERS"].usage == 1
    settings = fit_quotas(tmp_path / "sdm.db", read_plan(plan(tmp_path, (2, 8))), SETTINGS, api=api,
                          echo=lambda _: None)
    assert settings["max_vcpus"] == 6  # 12 - 4 in use - 2 for the database VM
    settings = fit_quotas(tmp_path / "sdm.db", read_plan(plan(tmp_path, (8, 32))), SETTINGS, api=api,
                          echo=lambda _: None)
    assert settings["max_vcpus"] == 8  # fits the limit: its group waits for the quota used elsewhere


def test_a_preemptible_quota_above_0_is_what_spot_vms_count_on(fake, tmp_path):
    fake.quotas.update(CPUS=8.0, PREEMPTIBLE_CPUS=48.0)
    plan_path = plan(tmp_path, (16, 64))
    spot = fit_quotas(tmp_path / "a.db", read_plan(plan_path), SETTINGS, echo=lambda _: None)
    assert spot["max_vcpus"] == 48
    with pytest.raises(BadInput, match="config c16-m64 needs 16 vCPUs; quota CPUS in region us-central1 is 8"):
        fit_quotas(tmp_path / "b.db", read_plan(plan_path), {**SETTINGS, "spot": False}, echo=lambda _: None)


def test_a_preemptible_quota_of_0_leaves_spot_vms_on_cpus_and_the_familys_quota(fake, tmp_path):
    fake.quotas.update(PREEMPTIBLE_CPUS=0.0, N2_CPUS=10.0)
    with pytest.raises(BadInput, match="config c12-m48 needs 12 vCPUs; quota N2_CPUS in region us-central1 is 10$"):
        fit_quotas(tmp_path / "sdm.db", read_plan(plan(tmp_path, (12, 48))), SETTINGS, echo=lambda _: None)


def test_the_dry_run_reads_the_quotas_and_says_what_it_could_not(fake, tmp_path):
    fake.quotas["CPUS"] = 24.0
    shown = bootstrap(tmp_path, plan(tmp_path, (4, 16)), "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert "quota CPUS in region us-central1: 0 of 24 in use" in shown.output
    assert "max_vcpus 22: what the quotas leave free for the groups" in shown.output
    fake.fail("GET", "regions/", 403, "forbidden", "Required 'compute.regions.get' permission for 'projects/my-proj'")
    shown = bootstrap(tmp_path, plan(tmp_path, (4, 16)), "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert "could not read the quotas" in shown.output and "compute.regions.get" in shown.output
    assert not fake.calls("POST")


def test_the_dry_run_prints_every_group_bootstrap_would_start_each_made_smaller_to_fit(fake, tmp_path):
    fake.quotas["CPUS"] = 12.0  # max_vcpus 10: c4-m16's 2 VMs, then 1 of c2-m8's 2; c8-m32 waits
    plan_path = plan_file(tmp_path, shape_rows((4, 16), 2, 2) + shape_rows((2, 8), 2, 2) + shape_rows((8, 32), 2, 2))
    shown = bootstrap(tmp_path, plan_path, "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert "would start the group of c4-m16: 2 VM(s) of 4 vCPUs" in shown.output
    assert "would start the group of c2-m8: 1 VM(s) of 2 vCPUs" in shown.output
    groups = [json.loads(line.split(" ", 2)[2]) for line in shown.output.splitlines()
              if line.startswith("POST ") and line.split(" ", 2)[1].endswith("/instanceGroupManagers")]
    assert [(group["name"], group["targetSize"]) for group in groups] == [("sdm-run-c4-m16", 2), ("sdm-run-c2-m8", 1)]
    assert not fake.calls("POST") and not (tmp_path / "run" / "sdm.db").exists()


def test_what_each_config_takes_one_of_and_addresses_are_respected():
    def quotas(**limits):
        return {metric: Quota(metric, limit, 0.0, "region r") for metric, limit in limits.items()}

    settings = {"external_ip": True, "spot": True}
    billed = lambda settings, cores, memory_gb: ("n2", True)  # noqa: E731
    configs = [("c4-m16", 4, 16), ("c2-m8", 2, 8)]
    assert fit(settings, configs, quotas(INSTANCE_GROUP_MANAGERS=0), billed).refusals == [
        "no config can run: quota INSTANCE_GROUP_MANAGERS in region r is 0"]
    assert fit(settings, configs, quotas(IN_USE_ADDRESSES=1), billed).refusals == [
        "no config can run: quota IN_USE_ADDRESSES in region r is 1, 1 of it for the database VM"]
    # 3 addresses: the database VM's and 2 VMs of at most 4 vCPUs.
    assert fit(settings, configs, quotas(IN_USE_ADDRESSES=3, CPUS=100), billed).max_vcpus == 8
    assert fit({**settings, "external_ip": False}, configs, quotas(IN_USE_ADDRESSES=3, CPUS=100),
               billed).max_vcpus == 98

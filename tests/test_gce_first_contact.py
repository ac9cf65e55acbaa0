"""What a first run on a real Compute Engine project would meet (issue 14), against the fake that
behaves like the API: each defect the old code had, and the fake's own rules."""

import json
import urllib.error
import urllib.request

import pytest
import yaml
from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.errors import BadInput, ProviderError
from sdm_peer.providers.base import GroupSpec, check_run
from sdm_peer.providers.gce import GceProvider, db_vm_body, gce_settings
from sdm_peer.providers.gce.api import ComputeApi, GroupCannotRun, provider_error

from .fake_gce import FakeCompute
from .runs import plan_file, sdm, shape_rows

SETTINGS = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "study1",
            "server": "10.0.0.2:7787"}
GROUPS = "/compute/v1/projects/my-proj/zones/us-central1-a/instanceGroupManagers"


def config(cores=2, memory_gb=8, group_size=1):
    return GroupSpec(f"c{cores}-m{memory_gb:g}", cores, memory_gb, group_size)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    server = FakeCompute(retry_delay=0.05).start()
    yield server
    server.stop()


@pytest.fixture
def api(fake):
    return ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))


def provider(api, **settings):
    return GceProvider({**SETTINGS, **settings}, "the-token", api=api)


# ---------------------------------------------------------------- the image runs cloud-init

def test_the_default_image_is_an_ubuntu_lts_family_that_runs_cloud_init():
    assert gce_settings(SETTINGS)["image"].startswith("projects/ubuntu-os-cloud/global/images/family/ubuntu-")


@pytest.mark.parametrize("project", ["debian-cloud", "centos-cloud", "rocky-linux-cloud", "rhel-cloud", "windows-cloud"])
def test_an_image_without_cloud_init_is_refused_naming_cloud_init_and_the_way_out(project):
    with pytest.raises(BadInput, match="does not run cloud-init") as refused:
        check_run({**SETTINGS, "image": f"projects/{project}/global/images/family/some-os"}, [(2, 8)])
    assert "ubuntu-os-cloud" in refused.value.hint and "--set image=" in refused.value.hint


def test_init_refuses_a_debian_image_with_exit_2(tmp_path):
    refused = sdm("init", tmp_path / "sdm.db", "--plan", plan_file(tmp_path, shape_rows((2, 8), 1)), "--set",
                  "provider=gce", "--set", "project=my-proj", "--set", "zone=us-central1-a", "--set", "run_name=r",
                  "--set", "image=projects/debian-cloud/global/images/family/debian-12", check=False)
    assert refused.returncode == 2 and "cloud-init" in refused.stderr
    assert not (tmp_path / "sdm.db").exists()


def test_the_fake_boots_nothing_from_user_data_on_an_image_without_cloud_init(tmp_path):
    from .fake_gce import FakeMetadata, LocalVms

    metadata = FakeMetadata()
    vms = LocalVms(tmp_path, metadata)
    vms.start("vm", {"items": [{"key": "user-data", "value": "#cloud-config\n"}]},
              "projects/debian-cloud/global/images/family/debian-12")
    assert vms.idle == ["vm"] and vms.processes == {}


# ---------------------------------------------------------------- request bodies as the API takes them

def test_the_database_vm_is_accepted_with_a_zonal_disk_type_url(fake, api):
    body = db_vm_body(gce_settings({**SETTINGS, "replica_url": "gs://b/r"}), "t")
    assert body["disks"][0]["initializeParams"]["diskType"] == "zones/us-central1-a/diskTypes/pd-balanced"
    assert api.insert_instance(body)


def test_the_fake_refuses_a_bare_disk_type_on_an_instance_and_a_url_in_a_template(fake, api):
    body = db_vm_body(gce_settings({**SETTINGS, "replica_url": "gs://b/r"}), "t")
    body["disks"][0]["initializeParams"]["diskType"] = "pd-balanced"  # what the old code sent
    with pytest.raises(ProviderError, match="diskType"):
        api.insert_instance(body)
    provider(api).create_group(config())
    template = fake.templates["sdm-study1-c2-m8"]["properties"]
    assert template["disks"][0]["initializeParams"]["diskType"] == "pd-balanced"
    assert template["machineType"] == "n2-custom-2-8192"


def post(fake, path, body):
    """A raw POST to the fake: what it answers a body the client library would not stop."""
    request = urllib.request.Request(f"http://{fake.address}/compute/v1/projects/my-proj/{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


@pytest.mark.parametrize("change, message", [
    (lambda body: body.update(colour="blue"), 'Unknown name "colour"'),
    (lambda body: body.update(name="x" * 64), "resource.name"),
    (lambda body: body.update(name="Upper"), "resource.name"),
    (lambda body: body["scheduling"].update(provisioningModel="CHEAP"), "not one of"),
    (lambda body: body.pop("name"), "Required field"),
    (lambda body: body["scheduling"].update(automaticRestart="yes"), "TYPE_BOOL"),
    (lambda body: body["disks"][0]["initializeParams"].update(diskSizeGb="twenty"), "int64"),
    (lambda body: body.update(machineType="e2-small"), "machineType"),
])
def test_the_fake_refuses_what_the_discovery_document_does_not_allow(fake, change, message):
    body = db_vm_body(gce_settings({**SETTINGS, "replica_url": "gs://b/r"}), "t")
    assert post(fake, "zones/us-central1-a/instances", json.loads(json.dumps(body)))[0] == 200
    body["name"] = "other"
    change(body)
    status, answer = post(fake, "zones/us-central1-a/instances", body)
    assert status == 400 and message in answer["error"]["message"]


def test_the_fake_refuses_a_group_without_target_size(fake):
    status, answer = post(fake, "zones/us-central1-a/instanceGroupManagers",
                          {"name": "g", "instanceTemplate": "projects/my-proj/global/instanceTemplates/t"})
    assert status == 400 and "targetSize" in answer["error"]["message"]


def test_a_custom_mode_network_needs_the_subnetwork_setting(fake, api):
    fake.add_network("lab", {"us-central1": ["lab-us"]})
    with pytest.raises(ProviderError, match="Subnetwork should be specified"):
        provider(api, network="lab").create_group(config())
    provider(api, network="lab", subnetwork="lab-us").create_group(config())
    interface = fake.templates["sdm-study1-c2-m8"]["properties"]["networkInterfaces"][0]
    assert interface["subnetwork"] == "regions/us-central1/subnetworks/lab-us"


def test_external_ip_false_gives_the_vms_no_external_address(fake, api):
    provider(api, external_ip=False).create_group(config())
    assert "accessConfigs" not in fake.templates["sdm-study1-c2-m8"]["properties"]["networkInterfaces"][0]


# ---------------------------------------------------------------- group health

def test_a_group_insert_is_done_before_its_vms_and_create_group_waits_for_the_first(fake, api):
    fake.vm_delay = 0.3
    provider(api).create_group(config(group_size=3))
    assert fake.calls("POST", "listManagedInstances$")
    assert any(record.get("_group") == "sdm-study1-c2-m8" for record in fake.instances.values())


def test_a_quota_the_group_cannot_fit_is_one_line_naming_metric_limit_and_region(fake, api):
    fake.quotas["N2_CPUS"] = 8.0
    with pytest.raises(GroupCannotRun) as refused:
        provider(api).create_group(config(cores=16, memory_gb=64))
    assert str(refused.value) == ("managed instance group sdm-study1-c16-m64 cannot make VMs: quota N2_CPUS exceeded "
                                  "(limit 8 in region us-central1)")
    assert "Quotas" in refused.value.hint
    assert "sdm-study1-c16-m64" in fake.groups  # the insert itself succeeded, as in the real API


def test_a_stockout_is_capacity_not_quota(fake, api):
    fake.stockouts.add("us-central1-a")
    with pytest.raises(GroupCannotRun, match="zone us-central1-a is out of capacity") as refused:
        provider(api).create_group(config())
    assert "quota" not in str(refused.value).lower() and "another zone" in refused.value.hint


def test_a_machine_type_the_zone_lacks_is_named(fake, api):
    fake.missing_families["us-central1-a"] = {"n2d"}
    with pytest.raises(GroupCannotRun, match="machine type n2d-custom-4-8192 does not exist in zone us-central1-a"):
        provider(api, machine_family="n2d").create_group(config(4, 8))


def test_a_group_that_never_runs_a_vm_ends_the_wait(fake, api):
    fake.vm_delay = 30  # nothing within the wait, and no error either
    with pytest.raises(ProviderError, match="no VM running after 1s"):
        provider(api, group_wait_seconds=1).create_group(config())


def test_group_up_exits_1_with_the_cause(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("SDM_GCE_API_ENDPOINT", fake.address)
    fake.quotas["CPUS"] = 0.0
    db = tmp_path / "sdm.db"
    sdm("init", db, "--plan", plan_file(tmp_path, shape_rows((1, 2), 1)), "--set", "provider=gce", "--set",
        "project=my-proj", "--set", "zone=us-central1-a", "--set", "run_name=ops")
    up = CliRunner().invoke(main, ["group", "up", "c1-m2", "--db", str(db)])
    assert up.exit_code == 1
    assert "quota CPUS exceeded (limit 0 in region us-central1)" in up.output


# ---------------------------------------------------------------- the rest of the list

def test_stockout_refusals_are_capacity_not_quota():
    from google.api_core import exceptions

    for code in ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"):
        exc = exceptions.Forbidden("no room", errors=[{"reason": code, "message": "no room"}])
        error = provider_error(exc, "creating VM x")
        assert "out of capacity" in str(error) and "quota" not in str(error).lower()


def test_the_firewalls_network_permission_is_attributed_to_security_admin():
    from google.api_core import exceptions

    exc = exceptions.Forbidden("Required 'compute.networks.updatePolicy' permission for "
                               "'projects/my-proj/global/networks/default'")
    assert "roles/compute.securityAdmin" in str(provider_error(exc, "creating firewall rule r"))


def test_a_domain_scoped_project_gets_its_internal_dns_name():
    unset = {key: value for key, value in SETTINGS.items() if key != "server"}
    assert gce_settings({**unset, "project": "example.com:proj"})["server"] == \
        "sdm-study1-db.us-central1-a.c.proj.example.com.internal:7787"
    assert gce_settings(unset)["server"] == "sdm-study1-db.us-central1-a.c.my-proj.internal:7787"


def test_lists_use_a_plain_name_filter_and_follow_pages(fake, api):
    for index in range(5):
        provider(api).create_group(config(2, 2 * (index + 1)))
    assert len(api.group_names("sdm-study1-")) == 5  # three pages of two
    assert len(fake.calls("GET", "instanceGroupManagers$")) == 3
    assert fake._query["filter"] == ['name eq "sdm-study1-.*"']


def test_some_operations_are_still_running_after_one_wait(fake, api):
    provider(api).create_group(config())
    waits = [path for method, path, _ in fake.requests if path.endswith("/wait")]
    assert len(waits) > len({path for path in waits})  # some operation was waited on twice


def test_the_next_provisioner_sweeps_templates_of_finished_configs(fake, api):
    gce = provider(api)
    gce.create_group(config(2, 8))
    gce.create_group(config(2, 4))
    fake.drop_group("sdm-study1-c2-m8")  # as when its own VM deleted it, dying before the template
    assert gce.sweep_templates(["c2-m8", "c2-m4"]) == ["sdm-study1-c2-m8"]  # c2-m4's group still uses its own
    assert list(fake.templates) == ["sdm-study1-c2-m4"]


def test_git_is_installed_only_where_something_is_cloned():
    from sdm_peer.providers.gce import cloudinit

    def packages(rendered):
        return yaml.safe_load(rendered)["packages"]

    settings = gce_settings({**SETTINGS, "replica_url": "gs://b/r"})
    git_spec = {**settings, "sdm_peer_spec": "sdm-peer[gce] @ git+https://example.com/sdm-peer.git@v1"}
    assert packages(cloudinit.render_db(settings, "t", 7787)) == ["python3-venv"]  # the run's wheel
    assert packages(cloudinit.render_db(git_spec, "t", 7787)) == ["python3-venv", "git"]
    assert packages(cloudinit.render_worker(git_spec)) == ["python3-venv", "git"]
    for code_url, wanted in [("", ["python3-venv"]), ("gs://b/code.tar.gz", ["python3-venv"]),
                             ("https://example.com/lab/model.git", ["python3-venv", "git"]),
                             ("file:///srv/model", ["python3-venv", "git"])]:
        assert packages(cloudinit.render_worker({**settings, "code_url": code_url})) == wanted, code_url

"""The gce provider through the real google-cloud-compute client against the fake Compute
Engine REST API: what it asks for, in which order, and how it takes refusals."""

import json

import pytest

from sdm_peer.errors import ProviderError
from sdm_peer.providers.base import GroupSpec
from sdm_peer.providers.gce import GceProvider
from sdm_peer.providers.gce.api import ComputeApi, DryRunApi

from .fake_gce import FakeCompute

SETTINGS = {"provider": "gce", "project": "my-proj", "zone": "us-central1-a", "run_name": "study1",
            "server": "10.0.0.2:7787", "code_url": "https://example.com/lab/model.git"}
TEMPLATES = "/compute/v1/projects/my-proj/global/instanceTemplates"
GROUPS = "/compute/v1/projects/my-proj/zones/us-central1-a/instanceGroupManagers"


def config(cores, memory_gb, group_size=3):
    return GroupSpec(f"c{cores}-m{memory_gb:g}", cores, memory_gb, group_size)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    server = FakeCompute().start()
    yield server
    server.stop()


@pytest.fixture
def provider(fake):
    def make(**settings):
        api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))
        return GceProvider({**SETTINGS, **settings}, "the-token", api=api)
    return make


def metadata_of(template):
    return {item["key"]: item["value"] for item in template["properties"]["metadata"]["items"]}


def test_create_group_makes_a_spot_template_then_a_group_of_group_size(fake, provider):
    provider().create_group(config(4, 16, group_size=5))
    inserts = [path for method, path, _ in fake.requests if method == "POST" and path in (TEMPLATES, GROUPS)]
    assert inserts == [TEMPLATES, GROUPS]
    template = fake.templates["sdm-study1-c4-m16"]
    properties = template["properties"]
    assert properties["machineType"] == "n2-custom-4-16384"
    assert properties["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                        "automaticRestart": False, "onHostMaintenance": "TERMINATE"}
    assert properties["labels"] == {"sdm-run": "study1", "sdm-config": "c4-m16"}
    assert properties["tags"] == {"items": ["sdm-study1-worker"]}
    metadata = metadata_of(template)
    assert set(metadata) == {"user-data", "shutdown-script", "sdm-server", "sdm-token", "sdm-run", "sdm-config",
                             "sdm-cores", "sdm-memory-gb"}
    assert metadata["user-data"].startswith("#cloud-config")
    assert "sdm-peer release --from-metadata" in metadata["shutdown-script"]
    assert (metadata["sdm-server"], metadata["sdm-token"], metadata["sdm-config"]) == \
        ("10.0.0.2:7787", "the-token", "c4-m16")
    assert (metadata["sdm-cores"], metadata["sdm-memory-gb"]) == ("4", "16")
    group = fake.groups["sdm-study1-c4-m16"]
    assert group["targetSize"] == 5 and group["baseInstanceName"] == "sdm-study1-c4-m16"
    assert group["instanceTemplate"] == "projects/my-proj/global/instanceTemplates/sdm-study1-c4-m16"


@pytest.mark.parametrize("cores, memory_gb, family, machine_type", [
    (2, 8, None, "n2-custom-2-8192"),
    (1, 2, None, "custom-1-2048"),
    (1, 8, None, "custom-1-8192-ext"),
    (2, 24, None, "n2-custom-2-24576-ext"),
    (2, 3.75, None, "n2-custom-2-3840"),
    (4, 8, "n2d", "n2d-custom-4-8192"),
    (4, 8, "e2", "e2-custom-4-8192"),
])
def test_template_machine_type_for_the_configs_shape(fake, provider, cores, memory_gb, family, machine_type):
    settings = {"machine_family": family} if family else {}
    provider(**settings).create_group(config(cores, memory_gb))
    (template,) = fake.templates.values()
    assert template["properties"]["machineType"] == machine_type


def test_a_shape_no_family_serves_is_refused_before_any_request(fake, provider):
    with pytest.raises(ProviderError, match="cannot be served.*1 vCPU x 0.5 GB"):
        provider().create_group(config(1, 0.5))
    assert fake.requests == []


def test_without_spot_the_vms_are_standard(fake, provider):
    provider(spot=False).create_group(config(2, 8))
    (template,) = fake.templates.values()
    assert template["properties"]["scheduling"]["provisioningModel"] == "STANDARD"


def test_create_group_twice_is_success_and_makes_one_group(fake, provider):
    gce = provider()
    gce.create_group(config(2, 8))
    gce.create_group(config(2, 8))
    assert list(fake.groups) == ["sdm-study1-c2-m8"] and list(fake.templates) == ["sdm-study1-c2-m8"]
    assert len(fake.calls("POST", "instanceGroupManagers$")) == 2  # the second was answered 409


def test_delete_group_removes_the_group_then_the_template_waiting_for_each(fake, provider):
    gce = provider()
    gce.create_group(config(2, 8))
    fake.requests.clear()
    gce.delete_group(GroupSpec("c2-m8"))
    assert fake.groups == {} and fake.templates == {}
    steps = [(method, "wait" if path.endswith("/wait") else path) for method, path, _ in fake.requests]
    group, template = steps.index(("DELETE", f"{GROUPS}/sdm-study1-c2-m8")), \
        steps.index(("DELETE", f"{TEMPLATES}/sdm-study1-c2-m8"))
    assert group == 0 and ("POST", "wait") in steps[group:template]  # waited for the group's deletion
    assert steps[template + 1:] and set(steps[template + 1:]) == {("POST", "wait")}


def test_delete_of_a_missing_group_is_success(fake, provider):
    gce = provider()
    gce.delete_group(GroupSpec("c2-m8"))
    gce.create_group(config(2, 8))
    gce.delete_group(GroupSpec("c2-m8"))
    gce.delete_group(GroupSpec("c2-m8"))
    assert fake.groups == {} and fake.templates == {}


def test_429_and_503_are_retried_until_they_pass(fake, provider):
    fake.fail("POST", "instanceTemplates$", 429, "rateLimitExceeded", "Rate Limit Exceeded", times=2)
    fake.fail("POST", "/operations/.*/wait$", 503, "backendError", "Backend Error", times=1)
    fake.fail("POST", "instanceGroupManagers$", 403, "rateLimitExceeded", "Rate Limit Exceeded", times=1)
    provider().create_group(config(2, 8))
    assert len(fake.calls("POST", "instanceTemplates$")) == 3
    assert len(fake.calls("POST", "instanceGroupManagers$")) == 2
    assert "sdm-study1-c2-m8" in fake.groups


def test_a_refusal_that_does_not_pass_becomes_one_error_after_the_retry_limit(fake):
    fake.fail("POST", "instanceTemplates$", 503, "backendError", "Backend Error", times=1000)
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=0.3, retry_wait=(0.01, 0.05))
    with pytest.raises(ProviderError, match="creating instance template sdm-study1-c2-m8: .*still refused"):
        GceProvider(SETTINGS, "t", api=api).create_group(config(2, 8))


def test_a_groups_insert_is_accepted_whatever_the_quota_and_its_vms_say_why_not(fake, provider):
    fake.quotas["N2_CPUS"] = 2.0
    with pytest.raises(ProviderError, match="sdm-study1-c4-m16 cannot make VMs: quota N2_CPUS exceeded"):
        provider().create_group(config(4, 16))  # VMs of 4 vCPUs: none fits
    assert "sdm-study1-c4-m16" in fake.groups and not fake.calls("POST", "instanceGroupManagers$")[1:]


def test_a_single_vms_quota_ends_its_insert_operation_naming_the_quota(fake):
    from sdm_peer.providers.gce import db_vm_body, gce_settings

    fake.quotas["CPUS"] = 1.0  # the database VM's e2-small has 2
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))
    with pytest.raises(ProviderError) as refused:
        api.insert_instance(db_vm_body(gce_settings({**SETTINGS, "replica_url": "gs://b/r"}), "t"))
    assert str(refused.value).startswith("creating VM sdm-study1-db: quota CPUS exceeded")
    assert "Quotas" in refused.value.hint and fake.instances == {}
    assert len(fake.calls("POST", "zones/us-central1-a/instances$")) == 1  # not retried


def test_a_single_vms_stockout_is_capacity(fake):
    from sdm_peer.providers.gce import db_vm_body, gce_settings

    fake.stockouts.add("us-central1-a")
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address, retry_seconds=5.0, retry_wait=(0.01, 0.05))
    with pytest.raises(ProviderError, match="creating VM sdm-study1-db: the zone is out of capacity") as refused:
        api.insert_instance(db_vm_body(gce_settings({**SETTINGS, "replica_url": "gs://b/r"}), "t"))
    assert "quota" not in str(refused.value).lower()


def test_permission_refusal_names_the_missing_role(fake, provider):
    fake.fail("POST", "instanceTemplates$", 403, "forbidden",
              "Required 'compute.instanceTemplates.create' permission for "
              "'projects/my-proj/global/instanceTemplates/sdm-study1-c2-m8'")
    with pytest.raises(ProviderError) as refused:
        provider().create_group(config(2, 8))
    assert str(refused.value) == ("creating instance template sdm-study1-c2-m8: permission "
                                  "compute.instanceTemplates.create denied; the account needs the role "
                                  "roles/compute.instanceAdmin.v1")
    assert "--role=roles/compute.instanceAdmin.v1" in refused.value.hint


def test_missing_template_for_a_group_is_a_plain_error(fake):
    api = ComputeApi("my-proj", "us-central1-a", endpoint=fake.address)
    with pytest.raises(ProviderError, match="creating managed instance group g: The resource .* was not found"):
        api.insert_group({"name": "g", "baseInstanceName": "g", "targetSize": 1,
                          "instanceTemplate": "projects/my-proj/global/instanceTemplates/nope"})


def test_dry_run_api_prints_each_call_with_the_token_hidden():
    lines = []
    GceProvider(SETTINGS, "secret-token", api=DryRunApi("my-proj", "us-central1-a", echo=lines.append)) \
        .create_group(config(2, 8))
    assert [line.split(" ", 2)[:2] for line in lines if line.startswith("POST ")] == [["POST", TEMPLATES],
                                                                                       ["POST", GROUPS]]
    template = json.loads(lines[0].split(" ", 2)[2])
    items = {item["key"]: item["value"] for item in template["properties"]["metadata"]["items"]}
    assert items["sdm-token"] == "<token>" and items["user-data"].startswith("<user-data: ")
    assert "secret-token" not in "".join(lines)


def test_without_credentials_the_error_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.delenv("SDM_GCE_API_ENDPOINT", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ProviderError, match="cannot use Compute Engine") as refused:
        ComputeApi("my-proj", "us-central1-a")
    assert "gcloud auth application-default login" in refused.value.hint

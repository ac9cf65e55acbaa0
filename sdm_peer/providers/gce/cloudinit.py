"""The cloud-configs that start the database VM and the worker VMs unattended (DESIGN §2, §6).

The templates are package data (sdm_peer/cloud_init/, linked from the top-level cloud-init/);
`{{name}}` marks a run value. Every value lands in a quoted YAML scalar or, inside a systemd
unit, escaped for systemd, so no value can change the document's structure."""

import json
import re
from importlib import resources

from . import package

# Where things live on a VM; the tests that run rendered command lines here map these paths.
VM_SDM_PEER = "/opt/sdm-peer/venv/bin/sdm-peer"
VM_STATE_DIR = "/var/lib/sdm-peer"
VM_ETC_DIR = "/etc/sdm-peer"
VM_WHEEL_DIR = "/opt/sdm-peer/wheels"
WORKER_UNIT = "sdm-peer-worker.service"
SERVE_UNIT = "sdm-peer-serve.service"

# Every package a cloud-config may name (`packages`); git only where something is cloned.
PACKAGES = ("python3-venv", "git")

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def template(name):
    return resources.files("sdm_peer").joinpath("cloud_init", name).read_text()


def _render(name, values):
    text = template(name)
    wanted = set(_PLACEHOLDER.findall(text))
    if wanted != set(values):
        raise ValueError(f"{name}: placeholders {sorted(wanted)} but values for {sorted(values)}")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def _yaml_string(value):
    """A YAML double-quoted scalar (JSON's string syntax is YAML's)."""
    return json.dumps(value)


def _systemd_word(value):
    """One argument of a systemd ExecStart line: specifiers (%) and variables ($) escaped;
    values with blanks or quotes are refused by the settings' validation before this."""
    if re.search(r"[\s\"'\\]", value):
        raise ValueError(f"{value!r} cannot be one word of a command line")
    return value.replace("%", "%%").replace("$", "$$")


def installing(settings):
    """What a VM fetches and pip-installs: the run's wheel, fetched from beside its replica and
    installed with its [gce] extra; or, with the `sdm_peer_spec` setting, that (nothing fetched);
    a run without a replica (made by `init`, not `bootstrap`) has no bucket for a wheel: its VMs
    install this version from the package index."""
    spec = settings.get("sdm_peer_spec")
    if not settings.get("replica_url"):
        spec = spec or f"sdm-peer[gce]=={package.version()}"
    wheel_file = f"{VM_WHEEL_DIR}/{package.wheel_name()}"
    return {"fetch_wheel": _yaml_string(template("fetch_wheel.py")),
            "wheel_url": _yaml_string("" if spec else package.wheel_url(settings)),
            "wheel_file": _yaml_string(wheel_file),
            "sdm_peer_spec": _yaml_string(spec or f"{wheel_file}[gce]")}


def _packages(settings, code_url=""):
    """The distribution packages a VM installs: python3-venv, and git where pip installs a git
    `sdm_peer_spec` or fetch-code clones the `code_url` (anything but a gs:// one)."""
    clones = "git+" in (settings.get("sdm_peer_spec") or "") or (code_url and not code_url.startswith("gs://"))
    return json.dumps([name for name in PACKAGES if name != "git" or clones])


def render_worker(settings):
    """The worker VM's cloud-config for a run (settings with the gce defaults applied)."""
    code_url = settings.get("code_url") or ""
    return _render("worker.yaml", {
        "run_name": settings["run_name"],
        "packages": _packages(settings, code_url),
        "code_url": _yaml_string(code_url),
        **installing(settings),
    })


def render_db(settings, token, port):
    """The database VM's cloud-config: the token file and the replicated server."""
    return _render("db.yaml", {
        "run_name": settings["run_name"],
        "packages": _packages(settings),
        "token": _yaml_string(token),
        "port": int(port),
        "replica_url": _systemd_word(settings["replica_url"]),
        **installing(settings),
    })


def shutdown_script():
    """The worker VMs' `shutdown-script`: release this worker's leases as the VM stops."""
    return template("shutdown.sh")

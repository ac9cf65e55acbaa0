"""Run settings (DESIGN §5): the known keys, their defaults, and parsing of --set / --settings.

Settings live in the database so that whichever worker inherits a provisioning lease knows
everything it needs. Values are validated here, before anything is written."""

import json
import re
import shlex
import tomllib
from pathlib import Path

from .errors import SettingsError
from .providers import base as providers

# Lease timing lives here and only here: workers renew at one third of the lease period.
DEFAULT_LEASE_SECONDS = 60
RENEW_FRACTION = 1 / 3
# A group the cloud could not make VMs for (quota, capacity) is tried again after the first of
# these, twice as long after each further failure, at most the second: never a hot loop.
GROUP_RETRY_SECONDS = (60.0, 1800.0)


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("a positive integer")
    return value


def _positive_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("a positive number")
    return value


def _text(value):
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _boolean(value):
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _provider(value):
    """`none` (workers started by hand) or a registered provider."""
    known = ("none", *providers.names())
    if value not in known:
        raise ValueError("one of " + ", ".join(known))
    return value


def _non_negative_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("a number, 0 or more")
    return value


def _zones(value):
    """Zones to try in order when one is out of capacity: a list, or a comma-separated string."""
    if isinstance(value, str):
        value = [zone.strip() for zone in value.split(",") if zone.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError("a list of zones such as [\"us-central1-a\", \"us-central1-b\"]")
    for zone in value:
        _zone(zone)
    return value


PRICE_KEYS = ("vcpu_hour", "gb_hour", "spot_vcpu_hour", "spot_gb_hour")


def _prices(value):
    """Overrides of the built-in price table: {"FAMILY": {KEY: USD, ...}}, KEY one of PRICE_KEYS."""
    if not isinstance(value, dict) or not all(isinstance(entry, dict) for entry in value.values()):
        raise ValueError('{"FAMILY": {"vcpu_hour": $, "gb_hour": $, "spot_vcpu_hour": $, "spot_gb_hour": $}}')
    for family, entry in value.items():
        for key, price in entry.items():
            if key not in PRICE_KEYS:
                raise ValueError(f"prices per family with the keys {', '.join(PRICE_KEYS)} ({family}: {key!r}?)")
            _non_negative_number(price)
    return {family.lower(): dict(entry) for family, entry in value.items()}


def _confine(value):
    """How the local provider confines each command to its shape (DESIGN §9)."""
    from .confine import CONFINEMENTS

    if value not in CONFINEMENTS:
        raise ValueError("one of " + ", ".join(CONFINEMENTS))
    return value


def _command(value):
    """A command is an argument list; a string is split as a shell would, but never run by one."""
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) for arg in value):
        raise ValueError("a non-empty command (a string or a list of strings)")
    return value


def _pattern(regex, description):
    """A string matching `regex` (whole), described as `description` in a refusal."""
    compiled = re.compile(regex)

    def check(value):
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise ValueError(description)
        return value
    return check


def _disk_gb(value):
    if _positive_int(value) < 10:
        raise ValueError("at least 10 (Compute Engine's smallest boot disk)")
    return value


def _server(value):
    host, sep, port = str(value).rpartition(":")
    if not isinstance(value, str) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("HOST:PORT")
    return value


def _machine_family(value):
    from .providers.gce import MACHINE_FAMILIES

    value = value.lower() if isinstance(value, str) else value
    if value not in MACHINE_FAMILIES:
        raise ValueError("one of " + ", ".join(MACHINE_FAMILIES))
    return value


# Google Cloud values are checked for their shape here, so a typo is refused at `init`, not
# when a worker weeks later inherits a provisioning lease. Whether the project exists is the
# API's to say.
_project = _pattern(r"([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]",
                    "a Google Cloud project ID (6-30 lowercase letters, digits, hyphens)")
_zone = _pattern(r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a zone such as us-central1-a")
_network = _pattern(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?|(projects/[^/\s]+/)?global/networks/[a-z][-a-z0-9]*",
                    "a network name or projects/P/global/networks/N")
_image = _pattern(r"(projects/[^/\s]+/)?global/images/(family/)?[a-z][-a-z0-9]*",
                  "an image such as projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64")
_subnetwork = _pattern(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?|(projects/[^/\s]+/)?regions/[a-z0-9-]+/subnetworks/[a-z][-a-z0-9]*",
                       "a subnetwork name or projects/P/regions/R/subnetworks/S")
_service_account = _pattern(r"default|[^@\s]+@[^@\s]+\.[^@\s]+", "`default` or a service account email")
_replica_url = _pattern(r"(gs|s3|abs|sftp|file)://\S+", "a Litestream replica URL (gs://BUCKET/PATH or file:///PATH)")
_code_url = _pattern(r"(https?|ssh|git)://\S+|git@[^:\s]+:\S+|gs://\S+|file:///\S+",
                     "a git URL (https://, ssh://, git@HOST:PATH) or a gs://BUCKET/PATH")
# run_name goes into resource names (<= 63 characters with the config's name) and labels.
_run_name = _pattern(r"[a-z]([-a-z0-9]{0,18}[a-z0-9])?",
                     "1-20 lowercase letters, digits or hyphens, starting with a letter")


SCHEMA = {
    "provider": _provider,
    "command": _command,
    "lease_seconds": _positive_number,
    "provision_lease_seconds": _positive_number,
    "group_size": _positive_int,
    "max_failures": _positive_int,
    "max_interruptions": _positive_int,
    # Cost (issue 9): hand off the next group at the last claim; idle workers leave their group.
    "prewarm": _boolean,
    "shrink": _boolean,
    # Measurement (issue 17): each local command on CPUs of its own, with its shape's memory.
    "confine": _confine,
    # Fitting the account (issue 16, DESIGN §8): how many vCPUs the groups may hold at once, a
    # hard spending cap and the prices it is counted in.
    "max_vcpus": _positive_int,
    "budget_usd": _non_negative_number,
    "prices": _prices,
    # Google Cloud (issue: GCE provider).
    "project": _project,
    "zone": _zone,
    "network": _network,
    "subnetwork": _subnetwork,
    "external_ip": _boolean,  # false: the network needs Cloud NAT for the VMs to install anything
    "group_wait_seconds": _positive_number,
    "zones": _zones,
    "spot_fallback_minutes": _positive_number,
    "image": _image,
    "disk_gb": _disk_gb,
    "spot": _boolean,
    "service_account": _service_account,
    "server": _server,
    "replica_url": _replica_url,
    "code_url": _code_url,
    "run_name": _run_name,
    "machine_family": _machine_family,
    "sdm_peer_spec": _text,
}

DEFAULTS = {
    "provider": "none",
    "lease_seconds": DEFAULT_LEASE_SECONDS,
    "provision_lease_seconds": 300,
    "group_size": 1,
    "max_failures": 3,
    "max_interruptions": 10,
    "prewarm": False,
    "shrink": False,
    "confine": "auto",
}


def validate(settings):
    """Return the settings with each value checked and normalised; refuse unknown keys."""
    clean = {}
    for key, value in settings.items():
        if key not in SCHEMA:
            raise SettingsError(f"unknown setting {key!r}; valid keys: {', '.join(sorted(SCHEMA))}")
        try:
            clean[key] = SCHEMA[key](value)
        except ValueError as exc:
            raise SettingsError(f"setting {key!r} must be {exc}, not {value!r}") from None
    return clean


def parse_assignments(assignments):
    """Parse `--set KEY=VALUE` items. A value that reads as JSON is taken as JSON (numbers,
    booleans, lists); anything else is a string."""
    parsed = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        parsed[key.strip()] = value
    return parsed


def read_file(path):
    """Settings from a JSON or TOML file (an object / a table of keys)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: settings must be an object of KEY: VALUE")
    return data


def with_defaults(settings):
    return {**DEFAULTS, **settings}

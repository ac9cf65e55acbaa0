"""Run settings (DESIGN §5): the known keys, their defaults, and parsing of --set / --settings.

Settings live in the database so that whichever worker inherits a provisioning lease knows
everything it needs. Values are validated here, before anything is written."""

import json
import shlex
import tomllib
from pathlib import Path

from .errors import SettingsError

PROVIDERS = ("none", "local", "gce")

# Lease timing lives here and only here: workers renew at one third of the lease period.
DEFAULT_LEASE_SECONDS = 60
RENEW_FRACTION = 1 / 3


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
    if value not in PROVIDERS:
        raise ValueError("one of " + ", ".join(PROVIDERS))
    return value


def _command(value):
    """A command is an argument list; a string is split as a shell would, but never run by one."""
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) for arg in value):
        raise ValueError("a non-empty command (a string or a list of strings)")
    return value


SCHEMA = {
    "provider": _provider,
    "command": _command,
    "lease_seconds": _positive_number,
    "provision_lease_seconds": _positive_number,
    "group_size": _positive_int,
    "max_failures": _positive_int,
    "max_interruptions": _positive_int,
    # Google Cloud (issue: GCE provider).
    "project": _text,
    "zone": _text,
    "network": _text,
    "image": _text,
    "disk_gb": _positive_int,
    "spot": _boolean,
    "service_account": _text,
    "server": _text,
    "replica_url": _text,
    "code_url": _text,
    "run_name": _text,
    "machine_family": _text,
}

DEFAULTS = {
    "provider": "none",
    "lease_seconds": DEFAULT_LEASE_SECONDS,
    "provision_lease_seconds": 300,
    "group_size": 1,
    "max_failures": 3,
    "max_interruptions": 10,
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

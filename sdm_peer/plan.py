"""Plan files (DESIGN §5): CSV, JSON (an array of objects) or JSONL, one experiment a row.

`cores` and `memory_gb` pick the config; optional `key` names the experiment (else a stable one
is made from the shape and the params, so re-running `init` adds nothing); optional
`group_size`; every other column is a parameter. Configs run in order of first appearance.
A plan is parsed and checked whole before anything is written: a bad row refuses the file."""

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlanError
from .store import config_name

RESERVED = ("cores", "memory_gb", "key", "group_size")
# Params travel in the environment (SDM_PARAMS), where Linux caps one variable at 128 KiB.
MAX_PARAMS_BYTES = 64 * 1024
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


@dataclass
class Config:
    name: str
    cores: int
    memory_gb: float
    group_size: int | None = None


@dataclass
class Experiment:
    key: str
    config: str
    params: dict


@dataclass
class Plan:
    configs: list = field(default_factory=list)
    experiments: list = field(default_factory=list)


def read_plan(path):
    """Parse and check a plan file; raise PlanError naming the file and row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise PlanError(f"{path}: the plan is empty")
    rows = list(_rows(path, text))
    if not rows:
        raise PlanError(f"{path}: the plan has no rows")
    return _build(path, rows)


def _rows(path, text):
    """Yield (where, row) pairs; `where` names the row for error messages."""
    kind = _format(path, text)
    if kind == "json":
        try:
            data = _json_loads(text)
        except ValueError as exc:
            raise PlanError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise PlanError(f"{path}: a JSON plan must be an array of objects")
        for number, row in enumerate(data, 1):
            yield f"row {number}", row
    elif kind == "jsonl":
        number = 0
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            number += 1
            try:
                row = _json_loads(line)
            except ValueError as exc:
                raise PlanError(f"{path}: row {number} (line {line_number}): not valid JSON: {exc}") from None
            yield f"row {number} (line {line_number})", row
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise PlanError(f"{path}: the plan is empty")
        for number, row in enumerate(reader, 1):
            if None in row:
                raise PlanError(f"{path}: row {number} (line {reader.line_num}): more cells than columns")
            yield f"row {number} (line {reader.line_num})", {
                name.strip(): _csv_value(value) for name, value in row.items() if value not in ("", None)}


def _format(path, text):
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    first = text.lstrip()[:1]
    return {"[": "json", "{": "jsonl"}.get(first, "csv")


def _csv_value(value):
    """CSV cells that read as numbers become numbers, as a spreadsheet would show them."""
    value = value.strip()
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value) and math.isfinite(float(value)):
        return float(value)
    return value


def _json_loads(text):
    """JSON as the standard has it: NaN, Infinity and numbers that overflow to inf are refused
    (SQLite would store NaN as NULL and refuses them inside JSON text)."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite_float)


def _not_a_number(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def _build(path, rows):
    plan = Plan()
    configs = {}
    keys = {}
    repeats = {}
    for where, row in rows:
        where = f"{path}: {where}"
        if not isinstance(row, dict):
            raise PlanError(f"{where}: expected an object, got {type(row).__name__}")
        cores = _shape_value(where, row, "cores", integer=True)
        memory_gb = _shape_value(where, row, "memory_gb", integer=False)
        group_size = row.get("group_size")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0):
            raise PlanError(f"{where}: group_size must be a positive integer, got {group_size!r}")
        name = config_name(cores, memory_gb)
        config = configs.get(name)
        if config is None:
            config = configs[name] = Config(name, cores, memory_gb, group_size)
            plan.configs.append(config)
        elif group_size is not None and config.group_size not in (None, group_size):
            raise PlanError(f"{where}: group_size {group_size} conflicts with {config.group_size}"
                            f" given earlier for config {name}")
        elif group_size is not None:
            config.group_size = group_size
        params = {k: v for k, v in row.items() if k not in RESERVED}
        size = len(json.dumps(params))
        if size > MAX_PARAMS_BYTES:
            raise PlanError(f"{where}: params take {size:,} bytes; at most {MAX_PARAMS_BYTES:,} are allowed"
                            " (put large inputs in files the command reads)")
        key = row.get("key")
        if key is None:
            key = _made_key(name, params, repeats)
        elif isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip():
            raise PlanError(f"{where}: key must be a non-empty string, got {key!r}")
        key = str(key).strip()
        if key in keys:
            raise PlanError(f"{where}: duplicate key {key!r} (first at {keys[key]})")
        keys[key] = where.split(": ", 1)[1]
        plan.experiments.append(Experiment(key, name, params))
    return plan


def _shape_value(where, row, column, *, integer):
    if column not in row:
        raise PlanError(f"{where}: missing column {column!r}")
    value = row[column]
    if isinstance(value, str):
        value = _csv_value(value)
    if isinstance(value, float) and integer and value.is_integer():
        value = int(value)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        noun = "a whole number" if integer else "a number"
        raise PlanError(f"{where}: {column} must be {noun}, got {row[column]!r}")
    if value <= 0:
        raise PlanError(f"{where}: {column} must be positive, got {row[column]!r}")
    return value


def _made_key(config, params, repeats):
    """A key stable across re-runs of `init`: the shape and a digest of the params; identical
    rows (replicates) are numbered in order of appearance."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = f"{config}-{digest}"
    repeats[base] = repeats.get(base, 0) + 1
    return base if repeats[base] == 1 else f"{base}-{repeats[base]}"

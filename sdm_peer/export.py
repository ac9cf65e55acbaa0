"""`sdm-peer export`: every experiment as one flat row, params and results spread into columns."""

import csv
import json
from pathlib import Path

from .errors import BadInput

FORMATS = (".csv", ".jsonl")


def flatten(experiment):
    """One flat dict: the experiment's own fields, then `param_<name>` and `result_<name>`.
    Nested values are kept as JSON text so every cell is a scalar."""
    row = {k: v for k, v in experiment.items() if k not in ("params", "result")}
    for prefix, values in (("param_", experiment["params"]), ("result_", experiment["result"] or {})):
        for name, value in values.items():
            row[prefix + name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return row


def export(store, out):
    """Write the run's experiments to `out` (.csv or .jsonl); return the number of rows."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise BadInput(f"{out}: export writes {' or '.join(FORMATS)} files")
    rows = [flatten(experiment) for experiment in store.experiments()]
    temporary = out.with_name(out.name + ".partial")
    with temporary.open("w", newline="") as handle:
        if out.suffix == ".jsonl":
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        else:
            columns = list(dict.fromkeys(column for row in rows for column in row))
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    temporary.replace(out)
    return len(rows)

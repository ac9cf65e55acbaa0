"""`sdm-peer demo`: a small real study on this machine with the local provider.

Three hardware shapes, eight species-distribution-model runs each (training-set size x grid
resolution), groups of two worker processes handing off to each other; a live progress view;
then mean times per shape and the path of the exported results."""

import csv
import itertools
import shutil
import statistics
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import run as run_ops
from . import states as st
from .errors import BadInput
from .export import export
from .overview import overview
from .store import Store
from .view import status_table

SHAPES = ((1, 1), (1, 2), (2, 2))
N_TRAIN = (250, 500, 1000, 2000)
RESOLUTION = (0.1, 0.05)
GROUP_SIZE = 2
MARKER = ".sdm-demo"
TIMEOUT = 300.0


def demo_plan(path):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cores", "memory_gb", "group_size", "n_train", "resolution"])
        for (cores, memory), n_train, resolution in itertools.product(SHAPES, N_TRAIN, RESOLUTION):
            writer.writerow([cores, memory, GROUP_SIZE, n_train, resolution])
    return path


def fresh_run_dir(run):
    """Replace a previous demo's directory; never touch a directory the demo did not make."""
    if run.path.exists():
        if not (run.path / MARKER).exists():
            raise BadInput(f"{run.path} exists and is not a demo run directory", hint="pass --dir NEWDIR")
        run_ops.stop(run)
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True)
    (run.path / MARKER).write_text("made by sdm-peer demo\n")


def run_demo(run, *, lease_seconds=10.0, console=None):
    console = console or Console()
    fresh_run_dir(run)
    plan = demo_plan(run.path / "plan.csv")
    settings = {"provider": "local", "lease_seconds": lease_seconds,
                "command": [sys.executable, "-m", "sdm_peer.examples.sdm_model"]}
    run_ops.init_run(run.db, plan, settings)
    console.print(f"[bold]sdm-peer demo[/]: {len(SHAPES)} shapes x {len(N_TRAIN) * len(RESOLUTION)} experiments, "
                  f"groups of {GROUP_SIZE} workers, in {run.path}")
    started = time.monotonic()
    try:
        with Store(run.db, create=False) as store:
            run_ops.bootstrap(run)
            status = _watch(store, console, started)
            out = run.path / "results.csv"
            export(store, out)
            console.print(_summary(store))
        elapsed = time.monotonic() - started
        done = status["totals"]["done"]
        console.print(f"{done} of {status['totals']['total']} experiments DONE in {elapsed:.1f}s; "
                      f"results in [bold]{out}[/]")
        console.print(f"see the run with: sdm-peer status --dir {run.path}")
    finally:
        run_ops.stop(run)


def _watch(store, console, started):
    """Show the status table live until every config is DONE."""
    def view(status):
        elapsed = Text(f"{time.monotonic() - started:.1f}s", style="dim")
        return Group(status_table(status), elapsed)

    status = overview(store, now=time.time(), with_replication=False)
    with Live(view(status), console=console, refresh_per_second=4, transient=False) as live:
        while any(config["state"] != st.CONFIG_DONE for config in status["configs"]):
            if time.monotonic() - started > TIMEOUT:
                raise BadInput(f"the demo did not finish within {TIMEOUT:.0f}s", hint="see the logs in the run directory")
            time.sleep(0.25)
            status = overview(store, now=time.time(), with_replication=False)
            live.update(view(status))
    console.print()
    return status


def _summary(store):
    """Mean seconds of fit, prediction and evaluation per shape, and the mean AUC."""
    by_config = {}
    for experiment in store.experiments():
        if experiment["result"]:
            by_config.setdefault(experiment["config"], []).append(experiment)
    table = Table(title="mean per shape", title_justify="left")
    for column in ("config", "runs", "fit s", "predict s", "evaluate s", "wall s", "AUC"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for config, runs in by_config.items():
        def mean(field, source="result"):
            values = [run[source][field] if source else run[field] for run in runs]
            values = [value for value in values if value is not None]
            return statistics.fmean(values) if values else float("nan")

        table.add_row(config, str(len(runs)), f"{mean('fit_seconds'):.4f}", f"{mean('predict_seconds'):.4f}",
                      f"{mean('evaluate_seconds'):.4f}", f"{mean('wall_seconds', None):.2f}", f"{mean('auc'):.3f}")
    return table

"""`sdm-peer report`: the study's answer, how run time responds to cores and memory.

From a run's database, read-only: PNG plots of wall time, and of every numeric `*_seconds`
field the command put in its results (fit_seconds, predict_seconds, ...), against cores and
against memory; for each, a table per shape (n, mean, median, p95); and the attempt history per
shape (failures, preemptions, compute time lost to re-runs) and the workers' idle time per shape.
Written as DIR/report.html with the PNGs beside it. matplotlib draws off-screen (Agg), without pyplot's global state."""

import html
import math
import statistics
import time
from pathlib import Path

from . import states as st
from .errors import BadInput
from .overview import idle_totals, seconds_text

REPORT_FILE = "report.html"
WALL = "wall_seconds"
SERIES_IN_LEGEND = 8  # more lines than this get a colour bar instead of a legend
TICKS_AT_VALUES = 12  # up to this many distinct cores (or memory) values, each gets its tick


def write_report(store, out_dir, *, now=None):
    """Write OUT_DIR/report.html and its plots; return {"path", "plots", "results"}."""
    out_dir, now = Path(out_dir), time.time() if now is None else now
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"{out_dir}: not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    experiments = list(store.experiments())
    done = [e for e in experiments if e["status"] == st.DONE]
    sections = []
    for metric in [WALL, *timing_fields(e["result"] or {} for e in done)]:
        runs = measurements(done, metric)
        if not runs:
            continue
        shapes = shape_table(runs)
        image = plot_file_name(metric)
        plot(metric_label(metric), runs, shapes, out_dir / image)
        sections.append((metric, image, shapes))
    status = store.status(now=now)
    history = attempt_rows(store.attempt_history(), {c["name"]: c["failed"] for c in status["configs"]})
    page = render(sections, history, status["totals"], database=store.path, results=len(done),
                  generated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                  idle=store.idle_accounting(now=now))
    path = out_dir / REPORT_FILE
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(page)
    temporary.replace(path)
    return {"path": path, "plots": [out_dir / image for _, image, _ in sections], "results": len(done)}


def timing_fields(results):
    """The numeric `*_seconds` fields found in any result, sorted."""
    return sorted({name for result in results for name, value in result.items()
                   if name.endswith("_seconds") and name != WALL and _number(value)})


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measurements(experiments, metric):
    """One {config, cores, memory_gb, value} per experiment that has the metric."""
    runs = []
    for experiment in experiments:
        value = experiment[WALL] if metric == WALL else (experiment["result"] or {}).get(metric)
        if _number(value):
            runs.append({"config": experiment["config"], "cores": experiment["cores"],
                         "memory_gb": experiment["memory_gb"], "value": value})
    return runs


def shape_table(runs):
    """Per shape, in run order: n, mean, median and p95 of the values."""
    by_shape = {}
    for run in runs:
        by_shape.setdefault((run["config"], run["cores"], run["memory_gb"]), []).append(run["value"])
    return [{"config": config, "cores": cores, "memory_gb": memory_gb, **summary(values)}
            for (config, cores, memory_gb), values in by_shape.items()]


def summary(values):
    """n, mean, median and p95 (linear interpolation between the closest ranks)."""
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values), "p95": p95}


def attempt_rows(history, failed_by_config):
    """Per shape: attempts by outcome, experiments FAILED, and the seconds of attempts that did
    not end DONE (their work is done again: compute lost to re-runs)."""
    rows = []
    for entry in history:
        outcomes = entry["outcomes"]
        count = {outcome: outcomes.get(outcome, {}).get("count", 0) for outcome in (st.DONE, *st.UNSUCCESSFUL)}
        lost = sum(outcomes[o]["seconds"] for o in st.UNSUCCESSFUL if o in outcomes)
        spent = sum(value["seconds"] for outcome, value in outcomes.items() if outcome is not None)
        rows.append({"config": entry["config"], "cores": entry["cores"], "memory_gb": entry["memory_gb"],
                     "attempts": sum(value["count"] for value in outcomes.values()), "done": count[st.DONE],
                     "errors": count[st.ERROR], "interrupted": count[st.INTERRUPTED], "expired": count[st.EXPIRED],
                     "lost_reports": count[st.LOST], "failed": failed_by_config.get(entry["config"], 0),
                     "rerun_seconds": lost, "spent_seconds": spent})
    return rows


def metric_label(metric):
    return "wall time" if metric == WALL else metric


def plot_file_name(metric):
    return "wall-time.png" if metric == WALL else "result-" + metric.replace("_", "-") + ".png"


# ---------------------------------------------------------------- plots

def plot(label, runs, shapes, path):
    """Two panels, against cores and against memory: every run in grey, and the mean per
    shape as one line per value of the other dimension."""
    try:
        from matplotlib import colormaps, colors
        from matplotlib.cm import ScalarMappable
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise BadInput("the report needs matplotlib", hint="pip install 'sdm-peer[report]'") from None

    figure = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    panels = (("cores", "cores", "memory_gb", lambda gb: f"{gb:g} GB"),
              ("memory_gb", "memory (GB)", "cores", lambda cores: f"{cores} core{'s' if cores != 1 else ''}"))
    for ax, (x, x_label, series, name) in zip(axes, panels):
        ax.scatter([r[x] for r in runs], [r["value"] for r in runs], s=9, color="0.72", zorder=1, label="each run")
        groups = sorted({shape[series] for shape in shapes})
        norm = colors.Normalize(min(groups), max(groups) if max(groups) > min(groups) else min(groups) + 1)
        for group in groups:
            points = sorted((shape[x], shape["mean"]) for shape in shapes if shape[series] == group)
            ax.plot(*zip(*points), marker="o", color=colormaps["viridis"](norm(group)), zorder=2,
                    label=f"mean, {name(group)}")
        if len(groups) <= SERIES_IN_LEGEND:
            ax.legend(fontsize=8)
        else:
            figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=f"{series} of the line")
        ax.set_xlabel(x_label)
        values = sorted({shape[x] for shape in shapes})
        if len(values) <= TICKS_AT_VALUES:
            ax.set_xticks(values, [f"{value:g}" for value in values])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=x == "cores"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{label} (s)")
    axes[0].set_ylim(bottom=0)
    figure.suptitle(f"{label} against cores and memory")
    figure.savefig(path)


# ---------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sdm-peer report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1060px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.8em; }}
table {{ border-collapse: collapse; margin: .6em 0; }}
th, td {{ padding: .2em .7em; text-align: right; white-space: nowrap; }}
th {{ border-bottom: 1px solid #999; }} td:first-child, th:first-child {{ text-align: left; }}
tr.all td {{ border-top: 1px solid #999; font-weight: 600; }}
img {{ max-width: 100%; }} .muted {{ color: #777; }}
</style></head><body>
<h1>sdm-peer report</h1>
<p class="muted">{database} · generated {generated}</p>
<p id="counts">{counts}</p>
{sections}
<h2>Attempt history</h2>
<p>Every claim is an attempt. Attempts that did not end DONE (the command failed, the worker was
interrupted or preempted, its lease expired, or its report came too late) are run again: their
seconds are compute lost to re-runs (the wall time the worker reported, else claim to end).</p>
{history}
<h2>Idle workers</h2>
<p>Per shape, the workers seen and their seconds alive (first to last call to the server; a VM's
boot before its first call is not in it) against their seconds running a command: the rest was
paid for and idle.</p>
{idle}
</body></html>
"""


def render(sections, history, totals, *, database, results, generated, idle):
    counts = (f"{totals['total']:,} experiments in {len(history):,} shapes: {totals['done']:,} DONE, "
              f"{totals['started']:,} running, {totals['failed']:,} FAILED, "
              f"{totals['not_started'] + totals['interrupted'] + totals['error']:,} waiting.")
    if not results:
        body = (f'<p id="empty"><strong>No results yet:</strong> none of the {totals["total"]:,} experiments is '
                f"DONE. Plots and tables appear here once results come in.</p>")
    else:
        body = "\n".join(metric_section(metric, image, shapes) for metric, image, shapes in sections)
    return PAGE.format(database=_e(database), generated=_e(generated), counts=_e(counts), sections=body,
                       history=history_table(history), idle=idle_table(idle))


def metric_section(metric, image, shapes):
    source = "measured by the worker, claim to report" if metric == WALL else "reported by the command in its result"
    rows = "".join(
        f"<tr><td>{_e(s['config'])}</td><td>{s['cores']}</td><td>{s['memory_gb']:g}</td><td>{s['n']}</td>"
        f"<td>{seconds_text(s['mean'])}</td><td>{seconds_text(s['median'])}</td><td>{seconds_text(s['p95'])}</td></tr>"
        for s in shapes)
    return (f'<h2>{_e(metric_label(metric))} <span class="muted">({source})</span></h2>\n'
            f'<img src="{image}" alt="{_e(metric_label(metric))} against cores and memory">\n'
            f'<table id="{_e(metric)}"><tr><th>shape</th><th>cores</th><th>memory GB</th><th>n</th>'
            f"<th>mean s</th><th>median s</th><th>p95 s</th></tr>{rows}</table>")


HISTORY_COLUMNS = (("attempts", "attempts"), ("done", st.DONE), ("errors", "errors"),
                   ("interrupted", "interrupted"), ("expired", "expired"), ("lost_reports", "late reports"),
                   ("failed", "experiments FAILED"))


def history_table(history):
    head = "".join(f"<th>{title}</th>" for _, title in HISTORY_COLUMNS)
    totals = {field: sum(row[field] for row in history) for field, _ in HISTORY_COLUMNS}
    totals.update(config="all", cores="", memory_gb="", rerun_seconds=sum(row["rerun_seconds"] for row in history),
                  spent_seconds=sum(row["spent_seconds"] for row in history))
    rows = "".join(_history_row(row) for row in history) + _history_row(totals, css="all")
    return (f'<table id="attempts"><tr><th>shape</th><th>cores</th><th>memory GB</th>{head}'
            f"<th>re-run compute s</th><th>share of compute</th></tr>{rows}</table>")


def _history_row(row, css=""):
    cells = "".join(f"<td>{row[field]:,}</td>" for field, _ in HISTORY_COLUMNS)
    share = f"{100 * row['rerun_seconds'] / row['spent_seconds']:.1f}%" if row["spent_seconds"] else "–"
    memory = f"{row['memory_gb']:g}" if row["memory_gb"] != "" else ""
    return (f'<tr class="{css}"><td>{_e(row["config"])}</td><td>{row["cores"]}</td><td>{memory}</td>{cells}'
            f"<td>{seconds_text(row['rerun_seconds'])}</td><td>{share}</td></tr>")


def idle_table(idle):
    """Per shape: workers seen, their seconds alive and running a command, the idle share."""
    total = idle_totals(idle)
    rows = [(row["config"], row["workers"], row["worker_seconds"], row["busy_seconds"], row["idle_fraction"])
            for row in idle]
    rows.append(("all", total["workers_seen"], total["worker_seconds"], total["busy_seconds"],
                 total["idle_fraction"]))
    cells = "".join(
        f'<tr class="{"all" if config == "all" else ""}"><td>{_e(config)}</td><td>{workers:,}</td>'
        f"<td>{seconds_text(alive)}</td><td>{seconds_text(busy)}</td>"
        f"<td>{'–' if fraction is None else f'{100 * fraction:.1f}%'}</td></tr>"
        for config, workers, alive, busy, fraction in rows)
    return (f'<table id="idle"><tr><th>shape</th><th>workers seen</th><th>worker s alive</th>'
            f"<th>worker s running a command</th><th>idle</th></tr>{cells}</table>")


def _e(value):
    return html.escape(str(value))

"""`sdm-peer report`: the study's answer, how run time responds to cores and memory.

From a run's database, read-only: PNG plots of wall time, and of every numeric `*_seconds`
field the command put in its results (fit_seconds, predict_seconds, ...), against cores and
against memory (one row of panels per value of the `--by` parameters), and as a cores × memory
heatmap; for each, a table per shape (n, mean, median, p95) and a fitted scaling curve
time = a · cores^b · (1 + c/memory) with its R² (runs whose timing is not the shape's, with
steal time over 5 %, an OOM or an interruption, are flagged and left out of the fit); where the
attempts ran (confinement, CPUs, steal, peak memory); and the attempt history per shape
(failures, preemptions, compute time lost to re-runs) and the workers' idle time per shape.
Written as DIR/report.html with the PNGs beside it. matplotlib draws off-screen (Agg), without pyplot's global state."""

import html
import json
import math
import statistics
import time
from pathlib import Path

from . import states as st
from .confine import STEAL_LIMIT, parse_cpu_list
from .errors import BadInput
from .overview import idle_totals, seconds_text

REPORT_FILE = "report.html"
WALL = "wall_seconds"
SERIES_IN_LEGEND = 8  # more lines than this get a colour bar instead of a legend
TICKS_AT_VALUES = 12  # up to this many distinct cores (or memory) values, each gets its tick
ANNOTATED_CELLS = 120  # heatmaps with up to this many cells print each cell's mean
OOM_PREFIX = "OOM:"  # how the worker's error for a command killed at its memory limit begins


def write_report(store, out_dir, *, now=None, by=()):
    """Write OUT_DIR/report.html and its plots; return {"path", "plots", "results"}. `by`:
    parameters whose every combination of values gets its own panels and its own fit."""
    out_dir, now, by = Path(out_dir), time.time() if now is None else now, tuple(by)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"{out_dir}: not a directory")
    experiments = list(store.experiments())
    known = {name for e in experiments for name in e["params"]}
    if unknown := [name for name in by if name not in known]:
        raise BadInput(f"--by {unknown[0]}: no experiment has that parameter",
                       hint="parameters: " + (", ".join(sorted(known)) or "none"))
    out_dir.mkdir(parents=True, exist_ok=True)
    oom_keys = {a["key"] for a in store.attempts() if (a["error"] or "").startswith(OOM_PREFIX)}
    done = [e for e in experiments if e["status"] == st.DONE]
    sections = []
    for metric in [WALL, *timing_fields(e["result"] or {} for e in done)]:
        runs = measurements(done, metric, by=by, oom_keys=oom_keys)
        if not runs:
            continue
        facets = facet(runs)
        fits = [{"facet": label, **fit_scaling(facet_runs)} for label, facet_runs in facets.items()]
        images = (plot_file_name(metric), heatmap_file_name(metric))
        plot(metric_label(metric), facets, fits, out_dir / images[0])
        heatmap(metric_label(metric), facets, out_dir / images[1])
        sections.append((metric, images, shape_table(runs), fits))
    status = store.status(now=now)
    history = attempt_rows(store.attempt_history(), {c["name"]: c["failed"] for c in status["configs"]})
    page = render(sections, history, status["totals"], database=store.path, results=len(done),
                  generated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                  idle=store.idle_accounting(now=now), hosts=host_rows(experiments), by=by)
    path = out_dir / REPORT_FILE
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(page)
    temporary.replace(path)
    return {"path": path, "plots": [out_dir / image for _, images, _, _ in sections for image in images],
            "results": len(done)}


def timing_fields(results):
    """The numeric `*_seconds` fields found in any result, sorted."""
    return sorted({name for result in results for name, value in result.items()
                   if name.endswith("_seconds") and name != WALL and _number(value)})


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measurements(experiments, metric, *, by=(), oom_keys=frozenset()):
    """One {config, cores, memory_gb, value, facet, flag} per experiment that has the metric:
    `facet` names its values of the `by` parameters, `flag` why its timing is not the shape's."""
    runs = []
    for experiment in experiments:
        value = experiment[WALL] if metric == WALL else (experiment["result"] or {}).get(metric)
        if _number(value):
            runs.append({"config": experiment["config"], "cores": experiment["cores"],
                         "memory_gb": experiment["memory_gb"], "value": value,
                         "facet": facet_label(experiment["params"], by), "flag": flag(experiment, oom_keys)})
    return runs


def facet_label(params, by):
    """"size=1000, species=oak" for by=("size", "species"); "" without --by."""
    return ", ".join(f"{name}={_param_text(params.get(name))}" for name in by)


def _param_text(value):
    return value if isinstance(value, str) else json.dumps(value)


def facet(runs):
    """The runs by facet, facets in the order of their values."""
    facets = {}
    for run in runs:
        facets.setdefault(run["facet"], []).append(run)
    return dict(sorted(facets.items(), key=lambda item: _natural(item[0])))


def _natural(label):
    """Sort key: numbers in a label compare as numbers (size=500 before size=1000)."""
    parts = []
    for piece in label.split(", "):
        name, _, value = piece.partition("=")
        try:
            parts.append((name, 0, float(value), ""))
        except ValueError:
            parts.append((name, 1, 0.0, value))
    return parts


def flag(experiment, oom_keys):
    """Why this experiment's timing is not its shape's (None: it is): an attempt killed by the
    OOM killer, an interruption, or steal time over STEAL_LIMIT of its CPU time."""
    if experiment["key"] in oom_keys:
        return "OOM"
    if experiment["interruptions"]:
        return "interrupted"
    steal, cpus, wall = experiment["host_steal_seconds"], experiment["host_cpus"], experiment["wall_seconds"]
    if steal and cpus and wall:
        share = steal / (wall * len(parse_cpu_list(cpus)))
        if share > STEAL_LIMIT:
            return f"steal {100 * share:.0f}%"
    return None


def fit_scaling(runs):
    """time = a · cores^b · (1 + c/memory), fitted to the unflagged runs by least squares on
    log time: for each c (searched on a log grid, then refined) a and b are linear. b is the
    cores exponent (-1: perfect speed-up), c the memory (GB) at which time doubles from its
    ample-memory value. A dimension with one value is not fitted (its parameter is None).
    Returns {n, flagged, a, b, c, r2}; a, b, c, r2 are None with fewer than 3 runs."""
    import numpy as np

    used = [run for run in runs if run["flag"] is None and run["value"] > 0]
    fitted = {"n": len(used), "flagged": sum(run["flag"] is not None for run in runs),
              "a": None, "b": None, "c": None, "r2": None}
    if len(used) < 3:
        return fitted
    cores = np.array([run["cores"] for run in used], dtype=float)
    memory = np.array([run["memory_gb"] for run in used], dtype=float)
    log_time = np.log([run["value"] for run in used])
    columns = [np.ones_like(cores)] + ([np.log(cores)] if len(set(cores)) > 1 else [])

    def solve(c):
        target = log_time - np.log1p(c / memory)
        coefficients, *_ = np.linalg.lstsq(np.column_stack(columns), target, rcond=None)
        return float(np.sum((target - np.column_stack(columns) @ coefficients) ** 2)), coefficients

    c = 0.0
    if len(set(memory)) > 1:
        grid = np.concatenate([[0.0], np.geomspace(memory.min() * 1e-3, memory.max() * 1e3, 241)])
        errors = [solve(candidate)[0] for candidate in grid]
        best = int(np.argmin(errors))
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        for _ in range(60):  # golden-section search between the best grid point's neighbours
            left, right = high - 0.618 * (high - low), low + 0.618 * (high - low)
            low, high = (low, right) if solve(left)[0] < solve(right)[0] else (left, high)
        c = (low + high) / 2
    error, coefficients = solve(c)
    total = float(np.sum((log_time - log_time.mean()) ** 2))
    fitted.update(a=float(np.exp(coefficients[0])), b=float(coefficients[1]) if len(columns) > 1 else None,
                  c=float(c) if len(set(memory)) > 1 else None, r2=1 - error / total if total > 0 else None)
    return fitted


def predicted(fit, cores, memory_gb):
    """The fitted curve's time at a shape."""
    return fit["a"] * cores ** (fit["b"] or 0.0) * (1 + (fit["c"] or 0.0) / memory_gb)


def host_rows(experiments):
    """Per shape, where its latest attempts ran: confinements, CPU models and platforms, the
    CPU lists seen, steal seconds (total), peak memory (largest) and boot-to-first-claim (mean)."""
    shapes = {}
    for experiment in experiments:
        if experiment["host_confinement"] is None:
            continue
        shapes.setdefault((experiment["config"], experiment["cores"], experiment["memory_gb"]), []).append(experiment)
    rows = []
    for (config, cores, memory_gb), runs in shapes.items():
        def distinct(column):
            return ", ".join(sorted({str(run[column]) for run in runs if run[column] is not None})) or "–"

        def values(column):
            return [run[column] for run in runs if run[column] is not None]
        rows.append({"config": config, "cores": cores, "memory_gb": memory_gb, "attempts": len(runs),
                     "confinement": distinct("host_confinement"), "cpus": distinct("host_cpus"),
                     "cpu_model": distinct("host_cpu_model"), "cpu_platform": distinct("host_cpu_platform"),
                     "steal_seconds": sum(values("host_steal_seconds")),
                     "max_rss_mb": max(values("host_max_rss_mb"), default=None),
                     "boot_seconds": statistics.fmean(values("host_boot_to_claim_seconds"))
                     if values("host_boot_to_claim_seconds") else None})
    return rows


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


def heatmap_file_name(metric):
    return plot_file_name(metric).replace(".png", "-heatmap.png")


# ---------------------------------------------------------------- plots

def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput("the report needs matplotlib", hint="pip install 'sdm-peer[report]'") from None
    from matplotlib.figure import Figure
    return Figure


def plot(label, facets, fits, path):
    """Per facet a row of two panels, against cores and against memory: every run in grey
    (flagged ones as red crosses), the mean per shape as one line per value of the other
    dimension, and the fitted curve dashed beside it."""
    Figure = _matplotlib()
    figure = Figure(figsize=(10, 0.6 + 3.8 * len(facets)), dpi=100, layout="constrained")
    rows = figure.subplots(len(facets), 2, sharey="row", squeeze=False)
    for axes, (name, runs), fit in zip(rows, facets.items(), fits):
        _plot_row(figure, axes, runs, shape_table(runs), fit)
        axes[0].set_ylabel(f"{label} (s)" + (f"\n{name}" if name else ""))
    figure.suptitle(f"{label} against cores and memory" + (", by " + _by_names(facets) if _by_names(facets) else ""))
    figure.savefig(path)


def _by_names(facets):
    first = next(iter(facets))
    return ", ".join(piece.partition("=")[0] for piece in first.split(", ")) if first else ""


def _plot_row(figure, axes, runs, shapes, fit):
    from matplotlib import colormaps, colors
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import MaxNLocator

    panels = (("cores", "cores", "memory_gb", lambda gb: f"{gb:g} GB"),
              ("memory_gb", "memory (GB)", "cores", lambda cores: f"{cores} core{'s' if cores != 1 else ''}"))
    for ax, (x, x_label, series, name) in zip(axes, panels):
        clean = [r for r in runs if r["flag"] is None]
        flagged = [r for r in runs if r["flag"] is not None]
        ax.scatter([r[x] for r in clean], [r["value"] for r in clean], s=9, color="0.72", zorder=1, label="each run")
        if flagged:
            ax.scatter([r[x] for r in flagged], [r["value"] for r in flagged], s=18, marker="x", color="tab:red",
                       zorder=3, label="flagged (not fitted)")
        groups = sorted({shape[series] for shape in shapes})
        norm = colors.Normalize(min(groups), max(groups) if max(groups) > min(groups) else min(groups) + 1)
        xs = sorted({shape[x] for shape in shapes})
        for group in groups:
            colour = colormaps["viridis"](norm(group))
            points = sorted((shape[x], shape["mean"]) for shape in shapes if shape[series] == group)
            ax.plot(*zip(*points), marker="o", color=colour, zorder=2, label=f"mean, {name(group)}")
            if fit["a"] is not None and len(xs) > 1:
                line = [xs[0] + (xs[-1] - xs[0]) * i / 40 for i in range(41)]
                shape_of = (lambda v: (v, group)) if x == "cores" else (lambda v: (group, v))
                ax.plot(line, [predicted(fit, *shape_of(v)) for v in line], linestyle="--", linewidth=1,
                        color=colour, zorder=2)
        if len(groups) <= SERIES_IN_LEGEND:
            ax.legend(fontsize=8)
        else:
            figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=f"{series} of the line")
        ax.set_xlabel(x_label)
        if len(xs) <= TICKS_AT_VALUES:
            ax.set_xticks(xs, [f"{value:g}" for value in xs])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=x == "cores"))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)


def heatmap(label, facets, path):
    """Per facet, the mean of each shape on a cores × memory grid (blank: no such shape)."""
    import numpy as np

    Figure = _matplotlib()
    figure = Figure(figsize=(min(6.0 * len(facets), 18.0), 4.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(facets), squeeze=False)[0]
    for ax, (name, runs) in zip(axes, facets.items()):
        shapes = shape_table(runs)
        cores, memory = sorted({s["cores"] for s in shapes}), sorted({s["memory_gb"] for s in shapes})
        grid = np.full((len(memory), len(cores)), np.nan)
        for shape in shapes:
            grid[memory.index(shape["memory_gb"]), cores.index(shape["cores"])] = shape["mean"]
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        if grid.size <= ANNOTATED_CELLS:
            middle = np.nanmean(grid)
            for (row, column), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(column, row, seconds_text(value), ha="center", va="center", fontsize=8,
                            color="white" if value < middle else "black")
        for set_ticks, values, text in ((ax.set_xticks, cores, "{:g}"), (ax.set_yticks, memory, "{:g}")):
            step = max(1, math.ceil(len(values) / TICKS_AT_VALUES))
            set_ticks(range(0, len(values), step), [text.format(v) for v in values[::step]])
        ax.set_xlabel("cores")
        ax.set_ylabel("memory (GB)")
        ax.set_title(name or f"mean {label}", fontsize=10)
        figure.colorbar(image, ax=ax, label=f"mean {label} (s)")
    figure.suptitle(f"{label}: mean per shape (cores × memory)")
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
<h2>Where it ran</h2>
<p>Per shape, what the latest attempt of each experiment recorded: how its command was confined
(cgroup: its own CPUs and the shape's memory as a hard limit; affinity: its own CPUs; none: the
whole machine, as on a cloud VM that is the shape), the CPUs it had, the CPU model (and a cloud
VM's CPU platform), the hypervisor's steal time on its CPUs, its peak memory, and a VM's seconds
from boot to its first claim.</p>
{hosts}
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


def render(sections, history, totals, *, database, results, generated, idle, hosts=(), by=()):
    counts = (f"{totals['total']:,} experiments in {len(history):,} shapes: {totals['done']:,} DONE, "
              f"{totals['started']:,} running, {totals['failed']:,} FAILED, "
              f"{totals['not_started'] + totals['interrupted'] + totals['error']:,} waiting.")
    if not results:
        body = (f'<p id="empty"><strong>No results yet:</strong> none of the {totals["total"]:,} experiments is '
                f"DONE. Plots and tables appear here once results come in.</p>")
    else:
        body = "\n".join(metric_section(metric, images, shapes, fits, by) for metric, images, shapes, fits in sections)
    return PAGE.format(database=_e(database), generated=_e(generated), counts=_e(counts), sections=body,
                       history=history_table(history), idle=idle_table(idle), hosts=host_table(hosts))


def metric_section(metric, images, shapes, fits, by=()):
    source = "measured by the worker, claim to report" if metric == WALL else "reported by the command in its result"
    rows = "".join(
        f"<tr><td>{_e(s['config'])}</td><td>{s['cores']}</td><td>{s['memory_gb']:g}</td><td>{s['n']}</td>"
        f"<td>{seconds_text(s['mean'])}</td><td>{seconds_text(s['median'])}</td><td>{seconds_text(s['p95'])}</td></tr>"
        for s in shapes)
    label = _e(metric_label(metric))
    return (f'<h2>{label} <span class="muted">({source})</span></h2>\n'
            f'<img src="{images[0]}" alt="{label} against cores and memory">\n'
            f'<img src="{images[1]}" alt="{label}: mean per shape, cores by memory">\n'
            f'<table id="{_e(metric)}"><tr><th>shape</th><th>cores</th><th>memory GB</th><th>n</th>'
            f"<th>mean s</th><th>median s</th><th>p95 s</th></tr>{rows}</table>\n" + fit_table(metric, fits, by))


def fit_table(metric, fits, by):
    """The fitted scaling curve per facet: the numbers a researcher can quote."""
    def number(value, digits=3):
        return _or_dash(value, f"{{:.{digits}g}}".format)
    head = "<th>" + _e(", ".join(by)) + "</th>" if by else "<th></th>"
    rows = "".join(
        f"<tr><td>{_e(fit['facet'] or 'all runs')}</td><td>{fit['n']}</td><td>{fit['flagged']}</td>"
        f"<td>{number(fit['a'])}</td><td>{number(fit['b'])}</td><td>{number(fit['c'])}</td>"
        f"<td>{number(fit['r2'], 4)}</td></tr>" for fit in fits)
    return (f'<p>Fitted: time = a · cores<sup>b</sup> · (1 + c / memory GB), least squares on log time. '
            f"b = −1 is a perfect speed-up with cores, 0 none; c is the memory at which time doubles. "
            f"Runs flagged (steal over {100 * STEAL_LIMIT:.0f} %, an OOM, an interruption) are left out.</p>\n"
            f'<table id="fit-{_e(metric)}"><tr>{head}<th>n fitted</th><th>flagged</th><th>a (s)</th>'
            f"<th>b (cores exponent)</th><th>c (GB)</th><th>R²</th></tr>{rows}</table>")


def host_table(hosts):
    if not hosts:
        return '<p class="muted" id="hosts">no attempt has recorded where it ran yet</p>'
    rows = "".join(
        f"<tr><td>{_e(h['config'])}</td><td>{h['cores']}</td><td>{h['memory_gb']:g}</td><td>{h['attempts']}</td>"
        f"<td>{_e(h['confinement'])}</td><td>{_e(h['cpus'])}</td><td>{_e(h['cpu_model'])}</td>"
        f"<td>{_e(h['cpu_platform'])}</td><td>{seconds_text(h['steal_seconds'])}</td>"
        f"<td>{_or_dash(h['max_rss_mb'], '{:,.0f}'.format)}</td>"
        f"<td>{_or_dash(h['boot_seconds'], seconds_text)}</td></tr>" for h in hosts)
    return ('<table id="hosts"><tr><th>shape</th><th>cores</th><th>memory GB</th><th>attempts</th>'
            "<th>confinement</th><th>CPUs</th><th>CPU model</th><th>CPU platform</th><th>steal s</th>"
            f"<th>peak memory MB</th><th>boot to first claim s</th></tr>{rows}</table>")


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


def _or_dash(value, text):
    return "–" if value is None else text(value)


def _e(value):
    return html.escape(str(value))

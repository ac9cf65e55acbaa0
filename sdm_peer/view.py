"""How a run looks to a person in a terminal (rich): the status table, and for `status` and
`status --watch` the live parts of the overview (leases, provisioning, events, throughput, ETA,
idle workers)."""

import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import states as st
from .overview import duration, event_text, finished, idle_text, seconds_text

STATE_STYLE = {st.WAITING: "dim", st.PROVISIONING: "yellow", st.RUNNING: "bold cyan", st.CONFIG_DONE: "green"}
SHOWN_WHEN_MANY = 30
BAR_WIDTH = 10
LEASES_SHOWN = 8  # rows: the terminal view must fit a screen
EVENTS_SHOWN = 6
EVENT_STYLE = {"error": "red", "expired": "yellow", "interrupted": "yellow", "lost": "yellow", "handoff": "cyan"}


def visible_configs(configs, show_all=False):
    """The configs worth a row: all of a short run; a long run's live ones and the next few."""
    if show_all or len(configs) <= SHOWN_WHEN_MANY:
        return configs
    live = [c for c in configs if c["state"] in (st.PROVISIONING, st.RUNNING)]
    waiting = [c for c in configs if c["state"] == st.WAITING][:5]
    return live + waiting


def hidden_summary(configs, shown):
    """'1,990 configs not shown (1,200 DONE, 790 WAITING)', or None when all are shown."""
    names = {c["name"] for c in shown}
    by_state = {}
    for config in configs:
        if config["name"] not in names:
            by_state[config["state"]] = by_state.get(config["state"], 0) + 1
    if not by_state:
        return None
    summary = ", ".join(f"{count:,} {state}" for state, count in by_state.items())
    return f"{sum(by_state.values()):,} configs not shown ({summary})"


def status_table(status, *, show_all=False):
    """A per-config table with progress bars; a long run shows its live configs and a summary."""
    configs = status["configs"]
    shown = visible_configs(configs, show_all)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, justify in (("config", "left"), ("state", "left"), ("progress", "left"), ("%", "right"),
                            ("done", "right"), ("running", "right"), ("waiting", "right"),
                            ("error", "right"), ("failed", "right"), ("mean s", "right")):
        table.add_column(column, justify=justify, no_wrap=True, min_width=len(column),
                         width=BAR_WIDTH if column == "progress" else None)
    for config in shown:
        table.add_row(*_config_cells(config))
    totals = status["totals"]
    table.add_section()
    table.add_row(Text("all", style="bold"), "", *_count_cells(totals), "")
    parts = [table]
    if "replication" in status:
        parts.append(replication_line(status["replication"]))
    hidden = hidden_summary(configs, shown)
    if hidden:
        parts.append(Text(f"{hidden}; --all shows them", style="dim"))
    return Group(*parts)


def status_view(status, *, show_all=False):
    """The status table and, when the status carries them, the live parts of the overview."""
    parts = [status_table(status, show_all=show_all)]
    if "eta_seconds" in status:
        parts.append(progress_line(status))
    if status.get("idle", {}).get("idle_fraction") is not None:
        parts.append(idle_line(status["idle"]))
    for provision in status.get("provisioning", ()):
        parts.append(provisioning_line(provision))
    if status.get("leases"):
        parts.append(leases_table(status["leases"], held=status["totals"]["started"]))
    if status.get("events"):
        parts.append(events_table(status["events"]))
    return Group(*parts)


def _config_cells(config):
    mean = config.get("mean_wall_seconds")
    return [config["name"], Text(config["state"], style=STATE_STYLE.get(config["state"], "")),
            *_count_cells(config), "" if mean is None else seconds_text(mean)]


def _count_cells(counts):
    total = counts["total"] or 1
    done = finished(counts)
    bar = ProgressBar(total=total, completed=done, width=BAR_WIDTH)
    percent = f"{100 * done / total:.1f}"
    waiting = counts["not_started"] + counts["interrupted"]
    started = f"{counts['started']:,}" + (f" ({counts['expired']} lapsed)" if counts.get("expired") else "")
    return [bar, percent, f"{counts['done']:,}", started, f"{waiting:,}", f"{counts['error']:,}", f"{counts['failed']:,}"]


def progress_line(status):
    """Throughput over the recent window and the ETA from measured wall times."""
    throughput = status["throughput"]
    rate = throughput["per_minute"]
    speed = (f"{rate:,.1f} done/min over the last {duration(throughput['window_seconds'])}" if rate is not None
             else "no result yet")
    eta = status["eta_seconds"]
    left = "all finished" if eta == 0 else f"ETA {duration(eta)} (from measured wall times)"
    return Text(f"throughput {speed} · {left}", style="bold")


def idle_line(idle):
    """Workers' seconds alive against seconds running a command, for the whole run."""
    return Text(idle_text(idle), style="dim")


def provisioning_line(provision):
    owner = f" by {provision['owner']}" if provision["owner"] else ""
    left = provision["seconds_left"]
    lease = "group made" if left is None else (f"lease {left:.0f}s left" if left > 0 else "lease lapsed")
    return Text(f"provisioning {provision['config']}{owner} ({lease})", style="yellow")


def leases_table(leases, *, held):
    title = f"leases: {held:,} held" + (f", the {LEASES_SHOWN} soonest to lapse" if held > LEASES_SHOWN else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for column in ("experiment", "config", "worker", "attempt", "left s", "running s"):
        table.add_column(column, justify="left" if column in ("experiment", "config", "worker") else "right",
                         no_wrap=True, overflow="ellipsis", max_width=40)
    for lease in leases[:LEASES_SHOWN]:
        left = lease["seconds_left"]
        table.add_row(lease["key"], lease["config"], lease["worker"], str(lease["attempt"]),
                      Text(f"{left:.0f}", style="red" if left <= 0 else ""), f"{lease['running_seconds']:.0f}")
    return table


def events_table(events):
    table = Table(title="recent events", title_justify="left", box=None, pad_edge=False, show_header=False)
    table.add_column("ago", justify="right", no_wrap=True)
    table.add_column("event", overflow="ellipsis", no_wrap=True)
    for event in events[:EVENTS_SHOWN]:
        table.add_row(f"{duration(event['seconds_ago'])} ago",
                      Text(event_text(event), style=EVENT_STYLE.get(event["kind"], "")))
    return table


def replication_line(replication):
    """One line on the replica: in sync or how far behind, and when it last received a change."""
    url = replication["replica_url"]
    if replication.get("error"):
        return Text(f"replica {url}: {replication['error']}", style="red")
    since = replication.get("seconds_since_sync")
    if since is None:
        return Text(f"replica {url}: no backup yet", style="yellow")
    state = "in sync" if replication["in_sync"] else "behind"
    return Text(f"replica {url}: {state}; last change shipped {since:.0f}s ago",
                style="green" if replication["in_sync"] else "yellow")


def watch(read, seconds, *, show_all=False, console=None):
    """Redraw the status every `seconds` until Ctrl-C, which ends it cleanly (the cursor is
    shown again and the last view stays on screen)."""
    console = console or Console()
    try:
        with Live(status_view(read(), show_all=show_all), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(seconds)
                live.update(status_view(read(), show_all=show_all), refresh=True)
    except KeyboardInterrupt:
        pass

"""How a run looks to a person in a terminal (rich): the status table, and for `status` and
`status --watch` the live parts of the overview (leases, provisioning, events, throughput, ETA,
idle workers). Every number and line comes from overview.py; this only styles them."""

import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import states as st
from .overview import (COUNT_COLUMNS, LEASE_COLUMNS, PROGRESS_COLUMNS, account_text, event_rows, hidden_summary,
                       idle_text, lease_rows, leases_text, mean_text, progress_cells, progress_text, provisioning_text,
                       replication_text, visible_configs)

STATE_STYLE = {st.WAITING: "dim", st.PROVISIONING: "yellow", st.RUNNING: "bold cyan", st.CONFIG_DONE: "green"}
BAR_WIDTH = 10
LEASES_SHOWN = 8  # rows: the terminal view must fit a screen
EVENTS_SHOWN = 6
EVENT_STYLE = {"error": "red", "expired": "yellow", "interrupted": "yellow", "lost": "yellow", "handoff": "cyan",
               "group_failed": "red"}
REPLICATION_STYLE = {"good": "green", "late": "yellow", "error": "red"}
LEFT_ALIGNED = ("config", "state", "progress", "experiment", "worker")


def status_table(status, *, show_all=False):
    """A per-config table with progress bars; a long run shows its live configs and a summary."""
    configs = status["configs"]
    shown = visible_configs(configs, show_all)
    # Columns one space apart and no edges, so that it fits an 80-column terminal: where room is
    # short the bar narrows and `running` wraps its "(N lapsed)"; no column is ever cut.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for column in PROGRESS_COLUMNS:
        table.add_column(column, justify="left" if column in LEFT_ALIGNED else "right",
                         no_wrap=column not in ("progress", "running"), min_width=len(column),
                         max_width=BAR_WIDTH if column == "progress" else None)
    for config in shown:
        table.add_row(config["name"], Text(config["state"], style=STATE_STYLE.get(config["state"], "")),
                      *_count_cells(config), mean_text(config))
    table.add_section()
    table.add_row(Text("all", style="bold"), "", *_count_cells(status["totals"]), "")
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
        parts.append(Text(progress_text(status), style="bold"))
    if status.get("idle", {}).get("idle_fraction") is not None:
        parts.append(Text(idle_text(status["idle"]), style="dim"))
    if account_text(status):
        parts.append(Text(account_text(status), style="red" if status["spend"]["stopped"] else "dim"))
    for provision in status.get("provisioning", ()):
        parts.append(Text(provisioning_text(provision), style="yellow"))
    if status.get("leases"):
        parts.append(leases_table(status["leases"], held=status["totals"]["started"]))
    if status.get("events"):
        parts.append(events_table(status["events"]))
    return Group(*parts)


def _count_cells(counts):
    cells = progress_cells(counts)
    bar = ProgressBar(total=1.0, completed=cells["fraction"])  # as wide as its column
    return [bar, cells["percent"], *(cells[column] for column in COUNT_COLUMNS)]


def leases_table(leases, *, held):
    table = Table(title=f"leases: {leases_text(held, LEASES_SHOWN)}", title_justify="left",
                  box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for column in LEASE_COLUMNS:
        table.add_column(column, justify="left" if column in LEFT_ALIGNED else "right",
                         no_wrap=True, overflow="ellipsis", max_width=40)
    for row in lease_rows(leases[:LEASES_SHOWN]):
        table.add_row(*(Text(row[column], style="red" if column == "left s" and row["lapsed"] else "")
                        for column in LEASE_COLUMNS))
    return table


def events_table(events):
    table = Table(title="recent events", title_justify="left", box=None, pad_edge=False, show_header=False)
    table.add_column("ago", justify="right", no_wrap=True)
    table.add_column("event", overflow="ellipsis", no_wrap=True)
    for row in event_rows(events[:EVENTS_SHOWN]):
        table.add_row(row["ago"], Text(row["text"], style=EVENT_STYLE.get(row["kind"], "")))
    return table


def replication_line(replication):
    """One line on the replica: in sync or how far behind, and when it last received a change."""
    text, standing = replication_text(replication)
    return Text(text, style=REPLICATION_STYLE[standing])


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

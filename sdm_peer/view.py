"""How a run looks to a person: the status table (rich) and figures in plain words."""

from rich import box
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import states as st

STATE_STYLE = {st.WAITING: "dim", st.PROVISIONING: "yellow", st.RUNNING: "bold cyan", st.CONFIG_DONE: "green"}
SHOWN_WHEN_MANY = 30
BAR_WIDTH = 12


def finished(counts):
    return counts["done"] + counts["failed"] + counts["legacy"]


def status_table(status, *, show_all=False):
    """A per-config table with progress bars; a long run shows its live configs and a summary."""
    configs = status["configs"]
    shown = configs
    if not show_all and len(configs) > SHOWN_WHEN_MANY:
        live = [c for c in configs if c["state"] in (st.PROVISIONING, st.RUNNING)]
        waiting = [c for c in configs if c["state"] == st.WAITING][:5]
        shown = live + waiting
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column, justify in (("config", "left"), ("state", "left"), ("progress", "left"), ("%", "right"),
                            ("done", "right"), ("running", "right"), ("waiting", "right"),
                            ("error", "right"), ("failed", "right")):
        table.add_column(column, justify=justify, no_wrap=True, min_width=len(column),
                         width=BAR_WIDTH if column == "progress" else None)
    for config in shown:
        table.add_row(*_config_cells(config))
    totals = status["totals"]
    table.add_section()
    table.add_row(Text("all", style="bold"), "", *_count_cells(totals))
    parts = [table]
    if "replication" in status:
        parts.append(replication_line(status["replication"]))
    hidden = len(configs) - len(shown)
    if hidden:
        by_state = {}
        for config in configs:
            if config not in shown:
                by_state[config["state"]] = by_state.get(config["state"], 0) + 1
        summary = ", ".join(f"{count:,} {state}" for state, count in by_state.items())
        parts.append(Text(f"{hidden:,} configs not shown ({summary}); --all shows them", style="dim"))
    return Group(*parts)


def _config_cells(config):
    return [config["name"], Text(config["state"], style=STATE_STYLE.get(config["state"], "")),
            *_count_cells(config)]


def _count_cells(counts):
    total = counts["total"] or 1
    done = finished(counts)
    bar = ProgressBar(total=total, completed=done, width=BAR_WIDTH)
    percent = f"{100 * done / total:.1f}"
    waiting = counts["not_started"] + counts["interrupted"]
    started = f"{counts['started']:,}" + (f" ({counts['expired']} lapsed)" if counts.get("expired") else "")
    return [bar, percent, f"{counts['done']:,}", started, f"{waiting:,}", f"{counts['error']:,}", f"{counts['failed']:,}"]


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

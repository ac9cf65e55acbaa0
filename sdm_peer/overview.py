"""The run as a person watching it needs to see it: `status --json`'s object (DESIGN §5) plus
the live leases, the group being provisioned, recent events, throughput, an ETA from measured
wall times, idle accounting (workers' seconds alive against seconds running a command, per
config and in `idle`) and, when the run replicates, the replica's lag.

One object for `status` (terminal and --json), the server's `status` op and the dashboard, so
the three never disagree. Times are seconds left or seconds ago, never clock values.

What a person reads is computed here too, once: the derived numbers of a progress row (waiting,
finished, percentage), the throughput and ETA line, the provisioning, replication and idle lines,
the lease rows and the events' words. view.py (rich) and dashboard.py (HTML) only style them."""

import statistics

from . import states as st
from .store import idle_fraction

LEASES_SHOWN = 20
EVENTS_SHOWN = 20
THROUGHPUT_WINDOW = 300.0  # seconds of DONE attempts the throughput is measured over
SHOWN_WHEN_MANY = 30  # configs: a longer run shows its live ones and the next few
WAITING_SHOWN = 5

# The columns of the progress table and of the leases table, in both views.
PROGRESS_COLUMNS = ("config", "state", "progress", "%", "done", "running", "waiting", "error", "failed", "mean s")
COUNT_COLUMNS = ("done", "running", "waiting", "error", "failed")  # the counts among them, as progress_cells names them
LEASE_COLUMNS = ("experiment", "config", "worker", "attempt", "left s", "running s")


def finished(counts):
    return counts["done"] + counts["failed"] + counts["legacy"]


def waiting(counts):
    """Experiments that wait for a claim: never started, or interrupted."""
    return counts["not_started"] + counts["interrupted"]


def overview(store, *, now, with_replication=True):
    """The status object with the live fields added (none of the contract's removed).

    `with_replication=False` skips asking Litestream (a subprocess): the server's database
    thread must not wait on it."""
    status = store.status(now=now)
    timings = store.timings(now=now, window=THROUGHPUT_WINDOW)
    idle = {row["config"]: row for row in store.idle_accounting(now=now)}
    for config in status["configs"]:
        measured = timings["configs"].get(config["name"])
        config["mean_wall_seconds"] = measured["mean_wall_seconds"] if measured else None
        accounting = idle[config["name"]]
        config.update(workers_seen=accounting["workers"], worker_seconds=round(accounting["worker_seconds"], 1),
                      busy_seconds=round(accounting["busy_seconds"], 1), idle_fraction=accounting["idle_fraction"])
    window = timings["window_seconds"]
    status.update(
        leases=store.leases(now=now, limit=LEASES_SHOWN),
        provisioning=store.provisioning(now=now),
        events=store.recent_events(now=now, limit=EVENTS_SHOWN),
        throughput={"done": timings["recent_done"], "window_seconds": round(window, 1),
                    "per_minute": round(60 * timings["recent_done"] / window, 2) if window > 0 else None},
        eta_seconds=eta_seconds(status["configs"]),
        idle=idle_totals(idle.values()),
        vcpus=store.vcpus(),
        spend=spend_of(store.spend(now=now), status["totals"]),
    )
    if with_replication and store.settings.get("replica_url"):
        status["replication"] = replication_of(store)
    return status


def spend_of(spend, totals):
    """The run's spend (DESIGN §8): `usd` so far, `projected_usd` for the whole plan at the
    spend per finished experiment so far (None before one finished), `budget_usd` (None: no
    cap) and whether it `stopped` the run."""
    done = finished(totals)
    projected = round(spend["usd"] * totals["total"] / done, 2) if done else None
    budget = spend["budget_usd"]
    return {"usd": round(spend["usd"], 2), "projected_usd": projected, "budget_usd": budget,
            "stopped": budget is not None and spend["usd"] >= budget}


def account_text(status):
    """vCPUs held against max_vcpus and spend against the budget, in one line; None when the
    status has neither a limit nor a spend (an older server's)."""
    vcpus, spend = status.get("vcpus"), status.get("spend")
    if not vcpus or not spend:
        return None
    limit = f" of {vcpus['limit']:,}" if vcpus["limit"] is not None else ""
    cap = f" of budget ${spend['budget_usd']:,.2f}" if spend["budget_usd"] is not None else ""
    projected = f", projected ${spend['projected_usd']:,.2f}" if spend["projected_usd"] is not None else ""
    stopped = ("; budget reached: nothing more is provisioned or claimed, raise it with"
               " `bootstrap --set budget_usd=...`" if spend["stopped"] else "")
    return f"vCPUs: {vcpus['in_use']:,}{limit} in use · spent ${spend['usd']:,.2f}{cap}{projected}{stopped}"


def idle_totals(rows):
    """The whole run's idle accounting: workers seen, seconds alive and busy, the idle fraction."""
    rows = list(rows)
    alive, busy = sum(row["worker_seconds"] for row in rows), sum(row["busy_seconds"] for row in rows)
    return {"workers_seen": sum(row["workers"] for row in rows), "worker_seconds": round(alive, 1),
            "busy_seconds": round(busy, 1), "idle_fraction": idle_fraction(alive, busy)}


def idle_text(idle):
    """The run's idle accounting in plain words (status and the dashboard)."""
    return (f"workers: {idle['workers_seen']:,} seen, alive {duration(idle['worker_seconds'])}, running commands "
            f"{duration(idle['busy_seconds'])}: {100 * idle['idle_fraction']:.0f}% idle")


def eta_seconds(configs):
    """Seconds until every config is finished, from measured mean wall times.

    Configs run one group after another, each group's workers in parallel; a config with no
    measurement yet borrows the mean of those that have one. With workers started by hand
    several configs may run at once, so this is then an upper bound. None before the first
    measurement."""
    remaining = [(config, config["total"] - finished(config)) for config in configs]
    if not any(left for _, left in remaining):
        return 0.0
    measured = [config["mean_wall_seconds"] for config in configs if config["mean_wall_seconds"] is not None]
    if not measured:
        return None
    fallback = statistics.fmean(measured)
    seconds = sum(left * (fallback if config["mean_wall_seconds"] is None else config["mean_wall_seconds"])
                  / config["group_size"] for config, left in remaining if left)
    return round(seconds, 1)


def replication_of(store):
    """How far the replica is behind (asks Litestream); an error is shown, never raised."""
    from .replication import ReplicationError, status as replication_status

    replica_url = store.settings["replica_url"]
    try:
        return replication_status(store.path, replica_url)
    except ReplicationError as exc:
        return {"replica_url": replica_url, "error": str(exc)}


# ---------------------------------------------------------------- what the views show


def visible_configs(configs, show_all=False):
    """The configs worth a row: all of a short run; a long run's live ones and the next few."""
    if show_all or len(configs) <= SHOWN_WHEN_MANY:
        return configs
    live = [c for c in configs if c["state"] in (st.PROVISIONING, st.RUNNING)]
    return live + [c for c in configs if c["state"] == st.WAITING][:WAITING_SHOWN]


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


def progress_cells(counts):
    """A progress row's numbers (a config's or the totals'): the finished fraction (for a bar),
    the percentage finished, and the COUNT_COLUMNS as text."""
    fraction = finished(counts) / counts["total"] if counts["total"] else 0.0
    lapsed = f" ({counts['expired']} lapsed)" if counts.get("expired") else ""
    return {"fraction": fraction, "percent": f"{100 * fraction:.1f}", "done": f"{counts['done']:,}",
            "running": f"{counts['started']:,}{lapsed}", "waiting": f"{waiting(counts):,}",
            "error": f"{counts['error']:,}", "failed": f"{counts['failed']:,}"}


def mean_text(config):
    """A config's measured mean wall time in seconds, or nothing before the first."""
    mean = config.get("mean_wall_seconds")
    return "" if mean is None else seconds_text(mean)


def progress_text(status):
    """Throughput over the recent window and the ETA from measured wall times."""
    throughput = status.get("throughput") or {}
    rate = throughput.get("per_minute")
    speed = ("no result yet" if rate is None
             else f"{rate:,.1f} done/min over the last {duration(throughput['window_seconds'])}")
    eta = status.get("eta_seconds")
    left = "all finished" if eta == 0 else f"ETA {duration(eta)} (from measured wall times)"
    return f"throughput {speed} · {left}"


def provisioning_text(provision):
    """A group being created: which, by whom, and its provisioning lease; after a try whose
    group could not run, why, and when it is tried again."""
    owner, left, error = provision["owner"], provision["seconds_left"], provision.get("error")
    if left is None:
        lease = "group made"
    elif owner is None and error:  # given up after the failure until the retry
        lease = f"retry in {duration(left)}" if left > 0 else "retry due"
    else:
        lease = f"lease {left:.0f}s left" if left > 0 else "lease lapsed"
    by = f" by {owner}" if owner else ""
    cause = f"; last try: {error}" if error and left is not None else ""
    return f"provisioning {provision['config']}{by} ({lease}){cause}"


def replication_text(replication):
    """The replica in one line, and how it stands: "good" (in sync), "late" (behind, or no
    backup yet) or "error"."""
    url = replication["replica_url"]
    if replication.get("error"):
        return f"replica {url}: {replication['error']}", "error"
    since = replication.get("seconds_since_sync")
    if since is None:
        return f"replica {url}: no backup yet", "late"
    state = "in sync" if replication["in_sync"] else "behind"
    return (f"replica {url}: {state}; last change shipped {since:.0f}s ago",
            "good" if replication["in_sync"] else "late")


def leases_text(held, shown):
    """'12 held, the 8 soonest to lapse' (or all of them: '3 held')."""
    return f"{held:,} held" + (f", the {shown} soonest to lapse" if held > shown else "")


def lease_rows(leases):
    """The leases as LEASE_COLUMNS' texts, each with `lapsed` (its time is up, not yet taken back)."""
    return [{"experiment": lease["key"], "config": lease["config"], "worker": lease["worker"],
             "attempt": str(lease["attempt"]), "left s": f"{lease['seconds_left']:.0f}",
             "running s": f"{lease['running_seconds']:.0f}", "lapsed": lease["seconds_left"] <= 0}
            for lease in leases]


def event_rows(events):
    """The feed: each event's kind, how long ago in words, and what happened."""
    return [{"kind": event["kind"], "ago": f"{duration(event['seconds_ago'])} ago", "text": event_text(event)}
            for event in events]


def event_text(event):
    """One event of the feed in plain words, without its time."""
    kind, config, worker, detail = event["kind"], event["config"], event["worker"], event["detail"]
    by = f" by {worker}" if worker else ""
    if event["key"] is not None:  # an attempt that did not end DONE
        what = {"error": "failed", "interrupted": "was interrupted", "expired": "lease expired",
                "lost": "reported after its lease was taken back"}.get(kind, kind)
        exit_code = f" (exit {detail['exit_code']})" if detail.get("exit_code") not in (None, 0) else ""
        error = f": {detail['error']}" if kind == "error" and detail.get("error") else ""
        return f"{event['key']} ({config}) {what}{exit_code} on {worker}{error}"
    if kind == "handoff":
        source = f" after {detail['from']}" if detail.get("from") else ""
        return f"hand-off: {config} to be provisioned{source}{by}"
    words = {"config_running": f"{config} running{by}", "config_done": f"{config} done{by}",
             "group_provisioned": f"group {config} provisioned{by}", "group_deleted": f"group {config} removed{by}",
             "provision_takeover": f"provisioning of {config} taken over{by}",
             "group_failed": f"group {config} cannot run{by}: {detail.get('error')}; removed, retried in "
                             f"{duration(detail.get('retry_seconds'))}",
             "config_reopened": f"{config} reopened by a new plan",
             "budget": (f"budget reached: ${detail.get('usd')} of ${detail.get('budget_usd')}; nothing more is"
                        " provisioned or claimed" if detail.get("stopped")
                        else f"budget raised to ${detail.get('budget_usd')}: the run goes on"),
             "zone_fallback": f"group {config} moved from zone {detail.get('from')} to {detail.get('to')}: "
                              f"{detail.get('cause')}",
             "spot_fallback": f"group {config} made standard: no spot capacity for "
                              f"{duration(detail.get('seconds'))}",
             "server_started": f"server started ({detail.get('leases_extended', 0)} leases extended)"}
    return words.get(kind, f"{kind} {config or ''}{by}".strip())


def seconds_text(value):
    """Three significant figures, whole seconds from 100 on: 0.000423, 0.796, 2.50, 12.0, 1,234."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def duration(seconds):
    """Seconds in the largest units that matter: 42s, 7m05s, 3h12m, 2d04h."""
    if seconds is None:
        return "unknown"
    if 0 < seconds < 0.5:
        return "<1s"
    seconds = max(0, round(seconds))
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // small_size:02d}{small}"
    return f"{seconds}s"

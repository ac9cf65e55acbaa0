"""sdm-peer benchmarks (issue 7): every figure next to a baseline measured in the same run.

    .venv/bin/python bench/run.py            quick mode (under 3 minutes on 2 cores): `make bench`
    .venv/bin/python bench/run.py --full     the long one: `make bench FULL=1`

Writes bench/results.json and prints a markdown table (figure | value | baseline | ratio) with
footnotes saying exactly what each figure measures. Numbers are printed, never asserted. Only
127.0.0.1 is used; every process started is stopped before the run ends.
"""

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name: (quick, full)
SIZES = {
    "jobs": (4_000, 20_000),  # raw SQLite, store cycle and peers: the same job count
    "full_seconds": (5.0, 60.0),  # at most this long for the raw FULL cycles (one fsync each: slow here)
    "adjacent_full_seconds": (2.0, 10.0),  # the same, for the baselines measured right before a section
    "template": (30_000, 150_000),  # experiments in the database each socket run gets a copy of
    "socket_seconds": (2.5, 10.0),  # measured window of each socket run
    "clients": ((1, 16, 64, 256, 1024), (1, 16, 64, 256, 1024)),
    "socket_repeats": (1, 3),  # runs of each socket figure; the median run (by cycles/s) is shown
    "large": ((200_000, 20_000), (1_000_000, 100_000)),  # the scale section's database: experiments, live leases
    "scale_rounds": (2, 4),  # rounds of the scale section, each one run on each database
    "renew_seconds": (5.0, 20.0),
    "memory_cycles": (20_000, 100_000),
    "recovery_rounds": (2, 5),
    "handoff_configs": (3, 5),
    "init_repeat": (1, 3),
}
SECTIONS = ("raw", "store", "socket", "scale", "renew", "memory", "peers", "recovery", "handoff", "init", "raw_again")
RENEW = {"leases": 10_000, "connections": 100, "rate": 500}
SCALE_CLIENTS = 16
LEASE_SECONDS = 2.0  # the recovery run's lease


def machine():
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    return {"cpus": os.cpu_count(), "cpu": model, "memory_gb": round(memory_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "system": f"{platform.system()} {platform.release()}", "load_before": os.getloadavg()}


# ------------------------------------------------------------------------------------------ sections

def section_raw(ctx, renew=True):
    import raw_sqlite

    return {"normal": raw_sqlite.cycles(ctx.scratch, ctx.size("jobs"), "NORMAL", renew=renew),
            "full": raw_sqlite.cycles(ctx.scratch, ctx.size("jobs"), "FULL", renew=False,
                                      max_seconds=ctx.size("full_seconds"))}


def section_raw_again(ctx):
    """The baselines once more at the end: how steady the machine was during the run."""
    return section_raw(ctx, renew=False)


def section_store(ctx):
    import store_cycle
    from common import copy_run

    out = {"baseline": ctx.baseline("NORMAL")}
    for processes in (1, 4):
        run = copy_run(ctx.template(), ctx.scratch / f"store-{processes}")
        out[f"p{processes}"] = store_cycle.cycles(run.db, ctx.size("jobs"), processes)
        shutil.rmtree(run.path)
    for served in (False, True):
        run = copy_run(ctx.template(), ctx.scratch / "store-batched")
        out["served" if served else "batched"] = store_cycle.batched_cpu(run.db, ctx.size("jobs"), batch=SCALE_CLIENTS,
                                                                          served=served)
        shutil.rmtree(run.path)
    run = copy_run(ctx.template(), ctx.scratch / "store-statements")
    out["statements"] = store_cycle.statement_costs(run.db, ctx.size("jobs"), batch=SCALE_CLIENTS)
    shutil.rmtree(run.path)
    return out


def section_socket(ctx):
    import socket_service

    out = {"baseline": {}}
    for durable in (False, True):
        out["baseline"].update(ctx.baseline("FULL" if durable else "NORMAL"))
        for clients in ctx.size("clients"):
            name = f"{'durable' if durable else 'default'}-{clients}"
            runs = sorted((socket_service.cycles(ctx.template(), ctx.scratch / f"socket-{name}", clients,
                                                 durable=durable, duration=ctx.size("socket_seconds"))
                           for _ in range(ctx.size("socket_repeats"))), key=lambda run: run["cycles_per_s"])
            out[name] = {**runs[len(runs) // 2], "all_cycles_per_s": [run["cycles_per_s"] for run in runs]}
            print(f"  socket {name}: {', '.join(f'{run:,.0f}' for run in out[name]['all_cycles_per_s'])} "
                  f"cycles/s", file=sys.stderr)
    return out


def section_scale(ctx):
    """The 16-client cycle on the usual template, then on a large database with many live leases."""
    import socket_service
    from common import make_large_run

    experiments, leases = ctx.size("large")
    began = time.time()
    large = make_large_run(ctx.scratch / "large-template", experiments, leases)
    out = {"experiments": experiments, "leases": leases, "build_s": time.time() - began,
           "baseline": ctx.baseline("NORMAL")}
    # Unmeasured: the first server run after the raw baseline ran up to a third slower than the
    # next in alternating A/B rounds; and the machine drifts, so the two databases alternate
    # (small, large, then large, small, ...) and each round gives one ratio.
    socket_service.cycles(ctx.template(), ctx.scratch / "scale-warm-up", SCALE_CLIENTS, durable=False,
                          duration=1.0)
    runs = {"small": [], "large": []}
    for number in range(ctx.size("scale_rounds")):
        order = ("small", "large") if number % 2 == 0 else ("large", "small")
        for name in order:
            template = ctx.template() if name == "small" else large
            runs[name].append(socket_service.cycles(template, ctx.scratch / f"scale-{name}-{number}", SCALE_CLIENTS,
                                                    durable=False, duration=ctx.size("socket_seconds")))
        print(f"  scale round {number}: small {runs['small'][-1]['cycles_per_s']:,.0f}, "
              f"large {runs['large'][-1]['cycles_per_s']:,.0f} cycles/s", file=sys.stderr)
    for name, measured in runs.items():
        out[name] = {**sorted(measured, key=lambda run: run["cycles_per_s"])[len(measured) // 2],
                     "all_cycles_per_s": [run["cycles_per_s"] for run in measured]}
    out["round_ratios"] = [large_run["cycles_per_s"] / small_run["cycles_per_s"]
                           for small_run, large_run in zip(runs["small"], runs["large"])]
    shutil.rmtree(large.path)
    return out


def section_renew(ctx):
    import socket_service

    baseline = ctx.baseline("NORMAL", renew=True)
    result = socket_service.renewals(ctx.template(), ctx.scratch / "renew", duration=ctx.size("renew_seconds"),
                                     **RENEW)
    return {**result, "baseline": baseline}


def section_memory(ctx):
    import socket_service

    result = socket_service.memory(ctx.template(), ctx.scratch / "memory", connections=1_000,
                                   cycles_total=ctx.size("memory_cycles"))
    return {"interpreter_peak_mb": socket_service.interpreter_rss_mb(), **result}


def section_peers(ctx):
    import peers

    baseline = {**ctx.baseline("NORMAL"), **ctx.baseline("FULL")}
    return {**peers.all_peers(ctx.scratch, ctx.size("jobs")), "baseline": baseline}


def section_recovery(ctx):
    import lifecycle

    return lifecycle.recovery(ctx.scratch / "recovery", rounds=ctx.size("recovery_rounds"), lease_seconds=LEASE_SECONDS)


def section_handoff(ctx):
    import lifecycle

    return lifecycle.handoff(ctx.scratch / "handoff", configs=ctx.size("handoff_configs"))


def section_init(ctx):
    import init_status

    command = init_status.sdm_peer_command()
    work = ctx.scratch / "init"
    work.mkdir()
    plan, db = work / "plan.csv", work / "run.db"
    experiments, configs = 84_400, 2_000
    init_status.build_plan(plan, experiments, configs)
    init_seconds = init_status.timed(command, "init", db, "--plan", plan)
    status_runs = [init_status.timed(command, "status", "--db", db, "--json") for _ in range(ctx.size("init_repeat"))]
    return {"experiments": experiments, "configs": configs, "init_s": init_seconds,
            "status_json_s": statistics.median(status_runs), "status_runs": status_runs,
            "database_mb": db.stat().st_size / 1e6}


def cli_startup(repeat=3):
    """`sdm-peer --help`: interpreter and CLI start-up, the floor of any command or worker."""
    import init_status

    command = init_status.sdm_peer_command()
    return statistics.median(init_status.timed(command, "--help") for _ in range(repeat))


class Context:
    def __init__(self, full, scratch):
        self.full, self.scratch = full, scratch
        self._template = None

    def size(self, name):
        return SIZES[name][1 if self.full else 0]

    def baseline(self, mode, renew=False):
        """The raw cycle of one synchronous mode, measured now: the baseline of the section
        that follows it (right next to it in time, so drift of the machine cancels out)."""
        import raw_sqlite

        cap = None if mode == "NORMAL" else self.size("adjacent_full_seconds")
        return {mode.lower(): raw_sqlite.cycles(self.scratch, self.size("jobs"), mode, renew=renew, max_seconds=cap,
                                                name=f"baseline-{mode.lower()}")}

    def template(self):
        """The database every socket and store run starts from a copy of (made once)."""
        if self._template is None:
            from common import make_run

            self._template = make_run(self.scratch / "template", self.size("template"))
        return self._template


# ------------------------------------------------------------------------------------------ the table

def _rate(value):
    return f"{value:,.0f}/s"


def _ratio(value, baseline):
    if value is None or not baseline:
        return "—"
    return f"{value / baseline:.2f}"


def _ms(value):
    return "—" if value is None else f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def _base(section, mode):
    """(value, text) of the raw cycle measured right before a section."""
    value = ((section or {}).get("baseline") or {}).get(mode, {}).get("cycles_per_s")
    return value, (f"raw {mode.upper()} {_rate(value)}, just before" if value else "—")


def _cycle_value(run):
    """Cycles/s, latency, worst cycle, jobs per client and server CPU of one socket run."""
    cpu, low_high = run["server_cpu_percent"], run.get("jobs_per_client")
    value = f"{_rate(run['cycles_per_s'])}; p50 {_ms(run['p50_ms'])}, p99 {_ms(run['p99_ms'])}"
    if run.get("worst_cycle_ms") is not None:
        value += f", worst cycle {_ms(run['worst_cycle_ms'])}"
    if low_high and run["clients"] > 1 and run.get("jobs_spread_percent") is not None:
        value += f"; jobs per client {low_high[0]:,}–{low_high[1]:,} (±{run['jobs_spread_percent']:.0f} %)"
    return value + (f"; server CPU {cpu:.0f} %" if cpu is not None else "")


def _cpu_rows(store_section, socket):
    """Where a cycle's CPU goes: raw SQLite's cycle, the store's batched cycle, the same with
    the protocol around it, and the server's at 16 clients, each against raw's."""
    rows = []
    base, _ = _base(store_section, "normal")
    for name, label in (("batched", f"store, {SCALE_CLIENTS} claims then their completes a transaction"),
                        ("served", "the same parsed, checked and answered through the op table")):
        run = (store_section or {}).get(name)
        if run and base:
            rows.append((f"CPU a cycle: {label} ¹¹", f"{run['cpu_us_per_cycle']:.0f} µs",
                         f"raw NORMAL cycle {1e6 / base:.0f} µs (1 ÷ its rate), just before",
                         _ratio(run["cpu_us_per_cycle"], 1e6 / base)))
    run = (socket or {}).get(f"default-{SCALE_CLIENTS}")
    base, _ = _base(socket, "normal")
    if run and base and run.get("server_cpu_percent") and run["cycles"]:
        server_us = 1e6 * run["server_cpu_percent"] / 100 * run["seconds"] / run["cycles"]
        rows.append((f"CPU a cycle: the server, {SCALE_CLIENTS} clients (socket ³) ¹¹", f"{server_us:.0f} µs",
                     f"raw NORMAL cycle {1e6 / base:.0f} µs, just before", _ratio(server_us, 1e6 / base)))
    return rows


def table(results, clients):
    """Rows of (figure, value, baseline, ratio)."""
    rows = []
    raw, again = results.get("raw") or {}, results.get("raw_again") or {}
    normal, full = (raw.get(mode, {}).get("cycles_per_s") for mode in ("normal", "full"))
    if normal:
        rows.append(("raw SQLite cycle, synchronous=NORMAL, at the start ¹", _rate(normal), "(the limit)", "1.00"))
    if full:
        rows.append(("raw SQLite cycle, synchronous=FULL, at the start ¹", _rate(full),
                     f"raw NORMAL {_rate(normal)}" if normal else "—", _ratio(full, normal)))
    for mode, base in (("normal", normal), ("full", full)):
        if again.get(mode):
            rows.append((f"raw SQLite cycle, synchronous={mode.upper()}, again at the end ¹",
                         _rate(again[mode]["cycles_per_s"]), f"at the start {_rate(base)}" if base else "—",
                         _ratio(again[mode]["cycles_per_s"], base)))
    store_section = results.get("store")
    for name, label in (("p1", "1 process"), ("p4", "4 processes, one file")):
        store = (store_section or {}).get(name)
        if store:
            base, text = _base(store_section, "normal")
            rows.append((f"store cycle in-process, {label} ²", _rate(store["cycles_per_s"]), text,
                         _ratio(store["cycles_per_s"], base)))
    rows += _cpu_rows(store_section, results.get("socket"))
    socket = results.get("socket") or {}
    for durable in (False, True):
        base, text = _base(socket, "full" if durable else "normal")
        for count in clients:
            run = socket.get(f"{'durable' if durable else 'default'}-{count}")
            if not run:
                continue
            mode = "`--durable`" if durable else "default"
            value = _cycle_value(run)
            if run["exhausted"] or run["errors"]:
                value += " (ran out of experiments)" if run["exhausted"] else f" (errors: {run['errors'][0]})"
            rows.append((f"socket service, {mode}, {count} client{'s' if count > 1 else ''} ³", value, text,
                         _ratio(run["cycles_per_s"], base)))
    scale = results.get("scale")
    if scale:
        base, text = _base(scale, "normal")
        small = scale["small"]
        rows.append((f"socket service, {SCALE_CLIENTS} clients, {results['sizes']['template']:,} experiments, "
                     "no lease ¹⁰", _cycle_value(small), text, _ratio(small["cycles_per_s"], base)))
        rows.append((f"socket service, {SCALE_CLIENTS} clients, {scale['experiments']:,} experiments, "
                     f"{scale['leases']:,} live leases ¹⁰", _cycle_value(scale["large"]),
                     f"the same on the small database {_rate(small['cycles_per_s'])}",
                     f"{statistics.median(scale['round_ratios']):.2f}"))
    renew = results.get("renew")
    if renew:
        raw_renew = renew["baseline"]["normal"].get("renew_per_s")
        floor = 100.0 * renew["target_per_s"] / raw_renew if raw_renew else None
        cpu = renew["server_cpu_percent"]
        value = (f"server CPU {cpu:.1f} % of a core at {renew['renewals_per_s']:,.0f} renewals/s; "
                 f"p50 {_ms(renew['p50_ms'])}, p99 {_ms(renew['p99_ms'])}")
        if renew["lost"] or renew["errors"]:
            value += f" ({renew['lost']} refused, errors: {renew['errors'][:1]})"
        rows.append((f"renew capacity: {renew['leases']:,} leases, {renew['connections']} connections ⁴", value,
                     f"raw SQLite CPU for {renew['target_per_s']} renew transactions/s: {floor:.1f} %, just before"
                     if floor else "—", _ratio(cpu, floor)))
    memory = results.get("memory")
    if memory:
        idle = memory["idle_peak_mb"]
        rows.append(("server peak RSS, idle ⁵", f"{idle:.1f} MiB",
                     f"interpreter + server modules {memory['interpreter_peak_mb']:.1f} MiB",
                     _ratio(idle, memory["interpreter_peak_mb"])))
        rows.append((f"server peak RSS, {memory['connections']:,} open connections ⁵",
                     f"{memory['connections_peak_mb']:.1f} MiB", f"idle {idle:.1f} MiB",
                     _ratio(memory["connections_peak_mb"], idle)))
        rows.append((f"server peak RSS, after {memory['cycles']:,} claim+complete cycles ⁵",
                     f"{memory['cycles_peak_mb']:.1f} MiB ({memory['cycles'] / memory['cycles_seconds']:,.0f} "
                     f"cycles/s, 16 clients)", f"idle {idle:.1f} MiB", _ratio(memory["cycles_peak_mb"], idle)))
    peers = results.get("peers") or {}
    for name, peer in peers.items():
        if name == "baseline":
            continue
        if "error" in peer:
            rows.append((f"peer: {name} ⁶", f"failed: {peer['error']}", "—", "—"))
            continue
        base, text = _base(peers, peer["synchronous"].lower())
        rows.append((f"peer: {name} {peer['version']} (synchronous={peer['synchronous']}) ⁶",
                     _rate(peer["cycles_per_s"]), text, _ratio(peer["cycles_per_s"], base)))
    startup = results.get("cli_startup_s")
    startup_text = f"`sdm-peer --help` {startup:.2f} s" if startup else "—"
    recovery = results.get("recovery")
    if recovery:
        rows.append((f"recovery: kill -9 of a worker → re-claim ({len(recovery['rounds'])} rounds) ⁷",
                     f"median {recovery['median_s']:.2f} s, max {recovery['max_s']:.2f} s "
                     f"({recovery['median_after_expiry_s']:.2f} s after expiry)",
                     f"lease {recovery['lease_seconds']:g} s", _ratio(recovery["median_s"], recovery["lease_seconds"])))
    handoff = results.get("handoff")
    if handoff and handoff["median_s"] is not None:
        rows.append((f"hand-off: config_done → next config_running ({handoff['handoffs']} hand-offs) ⁸",
                     f"median {handoff['median_s']:.2f} s, max {handoff['max_s']:.2f} s", startup_text,
                     _ratio(handoff["median_s"], startup)))
    init = results.get("init")
    if init:
        rows.append((f"`init` of {init['experiments']:,} experiments × {init['configs']:,} configs ⁹",
                     f"{init['init_s']:.2f} s", startup_text, _ratio(init["init_s"], startup)))
        rows.append(("`status --json` on it ⁹", f"{init['status_json_s']:.2f} s", startup_text,
                     _ratio(init["status_json_s"], startup)))
    for name, error in (results.get("errors") or {}).items():
        rows.append((f"{name}: FAILED", error.splitlines()[-1][:120], "—", "—"))
    return rows


FOOTNOTES = """\
¹ Plain sqlite3 in this process, one connection, WAL, busy_timeout, synchronous as named; {jobs:,} jobs
  inserted before the clock starts (FULL: as many of them as {full_seconds:g} s allow, one fsync per commit).
  One cycle = two transactions: `BEGIN IMMEDIATE; UPDATE jobs SET status='STARTED', owner, token, expires
  WHERE id = (first NOT STARTED by id, partial index) RETURNING id; COMMIT` then `BEGIN IMMEDIATE; UPDATE jobs
  SET status='DONE', result, lease cleared WHERE id = ? AND token = ? AND status = 'STARTED'; COMMIT`.
  Measured at the start, again at the end (the machine's drift over the run: other load, disk latency), and
  right before each section below ("just before": FULL capped at {adjacent_full_seconds:g} s), whose ratios are
  to that adjacent measurement, so that drift cancels out. {socket_note}
² `Store.claim` + `Store.complete` on a copy of a {template:,}-experiment database of one config ({jobs:,} cycles,
  each call its own transaction with attempt rows, worker row, lazy expiry and hand-off checks); with 4 processes
  each has its own Store on the same file and SQLite's busy timeout queues them.
³ `sdm-peer serve` (subprocess; default = synchronous=NORMAL, `--durable` = FULL) on a fresh copy of that database;
  N clients = N connections, one request in flight each, in up to 8 client processes (threads inside), framed with
  sdm_peer.protocol on plain sockets (not the retrying Client). Each client says `hello`, then the clock starts:
  claim then complete for {socket_seconds:g} s. Cycles/s = cycles finished in the window / window; p50/p99 over
  every claim and complete request in it; worst cycle = the longest claim + complete of any client; jobs per client
  = the fewest and most cycles one client finished, ± = the larger distance of the two from the mean; server CPU = its user+system time over the window (100 % = one core).
  The clients share the 2 cores with the server. Baseline: raw NORMAL (default) or raw FULL (`--durable`).
⁴ {leases:,} experiments claimed through the store (distinct worker ids) before the server starts
  (`--lease-seconds 3600`); {connections} connections renew them round-robin at {rate_each:g}/s each ({rate}/s in
  all: 10,000 workers renewing every 20 s), staggered, for {renew_seconds:g} s. Server CPU over that window via
  psutil (100 % = one core); p50/p99 of every renew. Baseline: the CPU that raw SQLite needs for the same number of
  one-UPDATE renew transactions (500 ÷ its renew transactions/s, NORMAL, measured just before).
⁵ Peak resident set (VmHWM of the server process; psutil's current RSS is in results.json): 0.5 s after start;
  with 1,000 connections open (each made one request); after the cycles (16 clients, synchronous=NORMAL).
  Baseline for idle: a Python process that imported sdm_peer's CLI, server and store modules and does nothing.
⁶ In this process, one thread, each peer with its own default pragmas, the same {jobs:,} jobs put before the clock
  starts (puts with synchronous=OFF; the peer's own setting restored before the clock). Baseline: the raw cycle
  of the same synchronous setting. persist-queue SQLiteAckQueue: get (row → unack) + ack (→ acked), two
  transactions; acknowledgement yes, lease no: an unacked row returns to ready only when the queue is reopened
  (auto_resume) or nack()ed, no token refuses a stale ack, gets are ordered by a Python lock (one process).
  litequeue: pop (row → LOCKED, UPDATE … RETURNING) + done (→ DONE), two transactions; acknowledgement yes, lease
  no: locked rows are only listed (list_locked) for the caller to retry by hand; no token. huey SqliteHuey: raw
  storage dequeue (SELECT + DELETE in one transaction), no task and no consumer process: no acknowledgement and no
  lease at all, a consumer that dies after dequeue loses the message. None of the three keeps attempt history.
⁷ `sdm-peer serve --lease-seconds {lease:g}` + 2 `sdm-peer work` (renewing every {renew_every:.2f} s): the victim
  runs a 120 s experiment, the survivor finished the other one and waits. The victim and its command get SIGKILL at a
  random point of the renewal period; seconds from the kill to the survivor's claim of that experiment (attempt 2's
  claimed_at, server clock). "after expiry" = minus the lease time the victim still held at the kill.
⁸ `sdm-peer bootstrap --provider local`, {handoff_configs} configs × 4 experiments of 0.05 s, group size 2: from each
  config's `config_done` event (the report that finished it) to the next config's `config_running` event (the
  first claim of its group: a supervisor and 2 worker processes started in between). Baseline: one CLI start-up.
⁹ bench/init_status.py's plan (84,400 experiments over 2,000 shapes, CSV): `sdm-peer init DB --plan FILE` on a new
  database, then `sdm-peer status --db DB --json` (median of {init_repeat}), as processes. Baseline: `sdm-peer
  --help` (interpreter + CLI start-up, median of 3).
¹⁰ The socket cycle of ³ ({scale_clients} clients, default mode) on a copy of the usual database, then on a copy of
  one of {large_experiments:,} experiments of one config whose first {large_leases:,} are STARTED with an hour of
  lease left (an attempt row each, distinct holders), made once by INSERT ... SELECT from a recursive CTE. After an
  unmeasured warm-up run, {scale_rounds} rounds, the order of the two databases alternating; the median run of each
  is shown, and the ratio is the median of the rounds' large ÷ small (1.00 = flat).
¹¹ CPU time (process_time) a claim + complete cycle costs, in this process on a copy of the database of ²:
  {scale_clients} claims in one transaction, then their {scale_clients} completes in one, as the server's group
  commit runs them with {scale_clients} clients; "parsed, checked and answered": each request also read from its
  line and checked through protocol.OPS, each answer encoded (the clients' lines are written off the clock). The
  server's: its CPU over the socket run ³ ÷ the cycles it served. A server on one core reaches 0.35 × raw NORMAL
  only if its cycle costs at most 2.9 × raw's (1 ÷ 0.35). results.json's store.statements has each SQL
  statement's share of the batched cycle (wall µs a cycle, executed and fetched), costliest first."""


def print_report(results, ctx):
    rows = table(results, ctx.size("clients"))
    info = results["machine"]
    print(f"\n## sdm-peer bench ({'full' if ctx.full else 'quick'} mode)\n")
    print(f"{info['cpus']} × {info['cpu']}, {info['memory_gb']} GB; {info['system']}; Python {info['python']}, "
          f"SQLite {info['sqlite']}; load average before {info['load_before'][0]:.2f}, after "
          f"{info['load_after'][0]:.2f}; {results['seconds']:.0f} s in all.\n")
    print("| figure | value | baseline (measured in the same run) | ratio |")
    print("|---|---|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(FOOTNOTES.format(jobs=ctx.size("jobs"), template=ctx.size("template"),
                           socket_seconds=ctx.size("socket_seconds"), renew_seconds=ctx.size("renew_seconds"),
                           rate_each=RENEW["rate"] / RENEW["connections"], lease=LEASE_SECONDS,
                           renew_every=LEASE_SECONDS / 3, handoff_configs=ctx.size("handoff_configs"),
                           init_repeat=ctx.size("init_repeat"), scale_clients=SCALE_CLIENTS, scale_rounds=ctx.size("scale_rounds"),
                           large_experiments=ctx.size("large")[0], large_leases=ctx.size("large")[1], full_seconds=ctx.size("full_seconds"),
                           adjacent_full_seconds=ctx.size("adjacent_full_seconds"),
                           socket_note=(f"Socket figures: the median of {ctx.size('socket_repeats')} runs."
                                        if ctx.size("socket_repeats") > 1 else "Socket figures: one run each."),
                           **RENEW))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the long run (`make bench FULL=1`)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--out", default=str(BENCH / "results.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    options = parser.parse_args()

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="sdm-bench-"))
    ctx = Context(options.full, scratch)
    results = {"mode": "full" if options.full else "quick", "machine": machine(), "sizes": {
        name: value[1 if options.full else 0] for name, value in SIZES.items()}, "errors": {}, "section_seconds": {}}
    try:
        results["cli_startup_s"] = cli_startup()
        for name in options.only or SECTIONS:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            began = time.time()
            try:
                results[name] = globals()[f"section_{name}"](ctx)
            except Exception:  # noqa: BLE001 - one section failing must not lose the others
                results["errors"][name] = traceback.format_exc()
                print(results["errors"][name], file=sys.stderr)
            results["section_seconds"][name] = round(time.time() - began, 1)
            print(f"bench: {name} took {results['section_seconds'][name]:.1f} s", file=sys.stderr, flush=True)
    finally:
        if options.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["machine"]["load_after"] = os.getloadavg()
    rows = print_report(results, ctx)
    results["table"] = [dict(zip(("figure", "value", "baseline", "ratio"), row)) for row in rows]
    Path(options.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {options.out}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())

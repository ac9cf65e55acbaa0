"""The socket service as workers see it: `sdm-peer serve` in its own process on a copy of a
database of one config, loaded from other processes (bench/loadgen.py).

  cycles     claim+complete cycles/s and request latency with N concurrent clients
  renewals   10,000 held leases renewed at 500/s in all: the server's CPU and the latency
  memory     the server's peak RSS idle, with 1,000 open connections, after N cycles
"""

import shutil
import subprocess
import sys
import threading
import time

import loadgen
from common import copy_run, cpu_seconds, peak_rss_mb, percentile, rss_mb, server
from sdm_peer.store import Store

PROCESSES = 8  # client processes at most; clients beyond that are threads in them


def _jobs(address, token, clients, *, duration, limit, prefix):
    jobs, number = [], 0
    for threads in loadgen.split(clients, PROCESSES):
        jobs.append([{"address": address, "token": token, "worker_id": f"{prefix}-{number + i}",
                      "duration": duration, "limit": limit} for i in range(threads)])
        number += threads
    return jobs


class CpuWindow:
    """The server's CPU seconds over [start, start + duration], read by a timer thread."""

    def __init__(self, pid, duration):
        self.pid, self.duration = pid, duration
        self.used = None
        self._timer = None

    def start(self, _start):
        before = cpu_seconds(self.pid)

        def read():
            try:
                self.used = cpu_seconds(self.pid) - before
            except Exception:  # noqa: BLE001 - the server is gone: no figure
                self.used = None
        self._timer = threading.Timer(self.duration, read)
        self._timer.start()

    def percent(self):
        if self._timer is None:
            return None
        self._timer.join()
        return None if self.used is None else 100.0 * self.used / self.duration


def _summary(reports, duration):
    latencies = [value for report in reports for value in report["latencies"]]
    per_client = [report["cycles"] for report in reports]
    cycles = sum(per_client)
    return {"cycles": cycles, "cycles_per_s": cycles / duration,
            "p50_ms": _ms(percentile(latencies, 0.50)), "p99_ms": _ms(percentile(latencies, 0.99)),
            "worst_cycle_ms": _ms(max((report["worst"] for report in reports), default=None)),
            "jobs_per_client": [min(per_client, default=0), max(per_client, default=0)],
            "jobs_spread_percent": _spread(per_client),
            "requests": len(latencies), "exhausted": any(report["exhausted"] for report in reports),
            "errors": sorted({report["error"] for report in reports if report["error"]})[:5]}


def _spread(per_client):
    """How far the busiest and the idlest client are from the mean, in % of it (the larger)."""
    if not per_client or not sum(per_client):
        return None
    mean = sum(per_client) / len(per_client)
    return 100.0 * max(max(per_client) - mean, mean - min(per_client)) / mean


def _ms(seconds):
    return None if seconds is None else seconds * 1000


def cycles(template, directory, clients, *, durable, duration):
    """Cycles/s and p50/p99 request latency (claim and complete alike) over `duration` seconds."""
    run = copy_run(template, directory)
    try:
        with server(run, *(["--durable"] if durable else [])) as process:
            window = CpuWindow(process.pid, duration)
            jobs = _jobs(process.address, process.token, clients, duration=duration, limit=10**9,
                         prefix=f"c{clients}")
            _, reports = loadgen.run("cycle", jobs, timeout=duration + 120, on_start=window.start)
            result = {"clients": clients, "durable": durable, "seconds": duration, **_summary(reports, duration),
                      "server_cpu_percent": window.percent()}
        return result
    finally:
        shutil.rmtree(run.path, ignore_errors=True)


def renewals(template, directory, *, leases, connections, rate, duration, processes=4, together=1):
    """`leases` experiments claimed (through the store, before the server starts), then renewed
    round-robin by `connections` connections at `rate` renewals/s in all for `duration` s
    (`together` leases in each request: a worker renewing all its leases at once)."""
    run = copy_run(template, directory)
    try:
        store = Store(run.db, create=False)
        try:
            batch = store.batch() if hasattr(store, "batch") else _no_batch(store)
            with batch:
                tokens = [store.claim(f"renewer-{n}", 1, 1, now=time.time(), lease_seconds=3600)
                          ["experiment"]["lease_token"] for n in range(leases)]
        finally:
            store.close()
        per_connection = rate / connections
        jobs, number = [], 0
        with server(run, "--lease-seconds", 3600) as process:
            for threads in loadgen.split(connections, processes):
                jobs.append([{"address": process.address, "token": process.token,
                              "leases": tokens[(number + i)::connections], "rate": per_connection,
                              "offset": (number + i) * together / rate, "duration": duration, "together": together}
                             for i in range(threads)])
                number += threads
            window = CpuWindow(process.pid, duration)
            _, reports = loadgen.run("renew", jobs, timeout=duration + 120, on_start=window.start)
            cpu = window.percent()
        latencies = [value for report in reports for value in report["latencies"]]
        sent = sum(report["sent"] for report in reports)
        return {"leases": leases, "connections": connections, "target_per_s": rate, "seconds": duration,
                "renewals": sent, "renewals_per_s": sent / duration, "lost": sum(r["lost"] for r in reports),
                "server_cpu_percent": cpu, "p50_ms": _ms(percentile(latencies, 0.50)),
                "p99_ms": _ms(percentile(latencies, 0.99)),
                "errors": sorted({report["error"] for report in reports if report["error"]})[:5]}
    finally:
        shutil.rmtree(run.path, ignore_errors=True)


class _no_batch:
    """Before group commit existed: one transaction per claim."""

    def __init__(self, store):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def interpreter_rss_mb():
    """The floor: a Python process with the server's modules imported, not serving (VmHWM)."""
    code = ("import sys, time, sdm_peer.cli, sdm_peer.server, sdm_peer.store; print('up', flush=True); "
            "sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        process.stdout.readline()
        return peak_rss_mb(process.pid)
    finally:
        process.stdin.close()
        process.wait(10)
        process.stdout.close()


def memory(template, directory, *, connections, cycles_total, clients=16):
    """Peak RSS (VmHWM) of the server: idle; while `connections` connections are open (each
    has made one request); after `cycles_total` claim+complete cycles by `clients` clients."""
    run = copy_run(template, directory)
    opened = []
    try:
        with server(run) as process:
            time.sleep(0.5)
            result = {"idle_peak_mb": peak_rss_mb(process.pid), "idle_rss_mb": rss_mb(process.pid)}
            try:
                for _ in range(connections):
                    connection = loadgen.Connection(process.address, process.token)
                    opened.append(connection)
                    try:
                        connection.call("renew", lease_token="no-such-lease")  # answered LEASE_LOST
                    except loadgen.Refused:
                        pass
                result.update(connections=len(opened), connections_peak_mb=peak_rss_mb(process.pid),
                              connections_rss_mb=rss_mb(process.pid))
            finally:
                for connection in opened:
                    connection.close()
            limit = -(-cycles_total // clients)
            started = time.time()
            jobs = _jobs(process.address, process.token, clients, duration=600, limit=limit, prefix="mem")
            _, reports = loadgen.run("cycle", jobs, timeout=900)
            seconds = time.time() - started
            done = sum(report["cycles"] for report in reports)
            result.update(cycles=done, cycles_seconds=seconds, cycles_peak_mb=peak_rss_mb(process.pid),
                          cycles_rss_mb=rss_mb(process.pid),
                          exhausted=any(report["exhausted"] for report in reports),
                          errors=sorted({report["error"] for report in reports if report["error"]})[:5])
        return result
    finally:
        shutil.rmtree(run.path, ignore_errors=True)

"""The store's own cycle, in-process: Store.claim + Store.complete (each its own BEGIN IMMEDIATE
transaction, with attempt rows, the worker row, lazy expiry and the hand-off checks), as the
server runs them but without a socket. 1 process, and N processes on one database file (each
with its own Store; SQLite's busy timeout queues the writers). And the CPU a cycle costs when
requests come in batches, as the server's group commit runs them: the store alone, with the
protocol's parsing and encoding around it, and statement by statement."""

import multiprocessing
import time

from sdm_peer import protocol
from sdm_peer.store import Store

from common import SHAPE


def _cycles(db, count, worker_id, go=None, out=None):
    store = Store(db, create=False)
    try:
        if go is not None:
            out.put(("ready", worker_id))
            go.wait(60)
        started = time.time()
        done = 0
        for _ in range(count):
            answer = store.claim(worker_id, *SHAPE, now=time.time(), lease_seconds=60)
            if answer["experiment"] is None:
                break
            store.complete(answer["experiment"]["lease_token"], {}, 0.0, now=time.time())
            done += 1
        result = {"cycles": done, "started": started, "ended": time.time()}
    finally:
        store.close()
    if out is not None:
        out.put(("done", result))
    return result


def cycles(db, count, processes=1):
    """Claim+complete cycles per second over `count` cycles in all, split over `processes`."""
    if processes == 1:
        result = _cycles(db, count, "bench-store-0")
        return {"processes": 1, "cycles": result["cycles"],
                "cycles_per_s": result["cycles"] / (result["ended"] - result["started"])}
    context = multiprocessing.get_context("fork")
    go, out = context.Event(), context.Queue()
    workers = [context.Process(target=_cycles, args=(str(db), count // processes, f"bench-store-{n}", go, out))
               for n in range(processes)]
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            kind, _ = out.get(timeout=60)
            assert kind == "ready"
        started = time.time()
        go.set()
        results = [out.get(timeout=300)[1] for _ in workers]
        ended = max(result["ended"] for result in results)
        done = sum(result["cycles"] for result in results)
        return {"processes": processes, "cycles": done, "cycles_per_s": done / (ended - started)}
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join()


def batched_cpu(db, count, *, batch=16, served=False):
    """CPU microseconds a cycle of the server's own work, in this process: `batch` claims in
    one transaction, then their `batch` completes in one (group commit, as the server runs
    them with that many clients). `served`: each request also parsed from its line and
    checked, through the op table, and each answer encoded, as the server does (the lines
    themselves are written outside the clock: that is the clients' work)."""
    store = Store(db, create=False)
    workers = [{"worker_id": f"bench-batch-{n}", "cores": SHAPE[0], "memory_gb": SHAPE[1]} for n in range(batch)]
    claim_lines = [protocol.encode_request(n, "claim", "token", args) for n, args in enumerate(workers)]
    used, done = 0.0, 0
    try:
        while done < count:
            if served:
                answers, cpu = _served(store, claim_lines)
                lines = [protocol.encode_request(n, "complete", "token", {
                    "lease_token": answer["experiment"]["lease_token"], "result": {}, "wall_seconds": 0.0})
                    for n, answer in enumerate(answers)]
                cpu += _served(store, lines)[1]
            else:
                started = time.process_time()
                _batched_cycles(store, workers)
                cpu = time.process_time() - started
            used += cpu
            done += batch
    finally:
        store.close()
    return {"batch": batch, "served": served, "cycles": done, "cpu_us_per_cycle": 1e6 * used / done}


def _batched_cycles(store, workers):
    """One claim per worker in one transaction, then their completes in one."""
    with store.batch():
        answers = [store.claim(**args, now=time.time(), lease_seconds=60) for args in workers]
    with store.batch():
        for answer in answers:
            store.complete(answer["experiment"]["lease_token"], {}, 0.0, now=time.time())


def _served(store, lines):
    """One batch as the server answers it: (results, CPU seconds)."""
    started = time.process_time()
    requests = [protocol.parse_request(line) for line in lines]
    context = protocol.Context(now=time.time(), lease_seconds=60)
    with store.batch():
        results = [protocol.OPS[request.op].handler(store, request.args, context) for request in requests]
    for request, result in zip(requests, results):
        protocol.encode_result(request.id, result)
    return results, time.process_time() - started


def statement_costs(db, count, *, batch=16):
    """Wall microseconds a cycle each SQL statement of the batched cycle takes (executed and
    its rows fetched), by statement, costliest first; timing each call adds about a
    microsecond to it."""
    from collections import Counter

    store = Store(db, create=False)
    spent, calls = Counter(), Counter()
    store.conn = _TimedConnection(store.conn, spent, calls)
    workers = [{"worker_id": f"bench-statements-{n}", "cores": SHAPE[0], "memory_gb": SHAPE[1]} for n in range(batch)]
    done = 0
    try:
        while done < count:
            _batched_cycles(store, workers)
            done += batch
    finally:
        store.conn.close()
    return [{"statement": sql, "us_per_cycle": 1e6 * seconds / done, "per_cycle": calls[sql] / done}
            for sql, seconds in spent.most_common()]


class _TimedConnection:
    """A connection whose execute() times the statement and the fetch of all its rows."""

    def __init__(self, conn, spent, calls):
        self._conn, self._spent, self._calls = conn, spent, calls

    def execute(self, sql, *args):
        started = time.perf_counter()
        rows = self._conn.execute(sql, *args).fetchall()
        name = " ".join(sql.split())[:80]
        self._spent[name] += time.perf_counter() - started
        self._calls[name] += 1
        return _Fetched(rows)

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _Fetched:
    def __init__(self, rows):
        self.rows = rows

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows

    def __iter__(self):
        return iter(self.rows)

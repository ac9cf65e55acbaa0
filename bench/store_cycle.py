"""The store's own cycle, in-process: Store.claim + Store.complete (each its own BEGIN IMMEDIATE
transaction, with attempt rows, the worker row, lazy expiry and the hand-off checks), as the
server runs them but without a socket. 1 process, and N processes on one database file (each
with its own Store; SQLite's busy timeout queues the writers)."""

import multiprocessing
import time

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

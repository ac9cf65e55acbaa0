"""The peers, in-process, one thread, each with its own defaults (as a user would get them), doing
the closest thing each has to a claim+complete cycle over the same number of jobs. Jobs are put
before the clock starts. What each guarantees (bench/run.py prints it as a footnote):

  persist-queue SQLiteAckQueue  get() marks a row unacked, ack() marks it acked: two transactions.
                                No lease: an unacked row goes back to ready only when the queue is
                                reopened (auto_resume) or nack()ed; no token, so a stale ack is
                                not refused; one process (a Python lock, not the database, orders gets).
  litequeue LiteQueue           pop() marks a row LOCKED (UPDATE ... RETURNING), done() marks it
                                DONE: two transactions. No lease: locked rows are only listed
                                (list_locked(threshold)) for the user to retry by hand; no token.
  huey SqliteHuey               dequeue() SELECTs and DELETEs the message in one transaction: no
                                acknowledgement and no lease; a consumer that dies after dequeue
                                loses the message. (Raw storage enqueue/dequeue; no task, no worker.)

Setup (the puts) runs with synchronous=OFF to save time; each peer's own setting is put back
before the clock starts.
"""

import contextlib
import json
import sqlite3
import time
from pathlib import Path

SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _pragmas(conn):
    return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous": SYNCHRONOUS[conn.execute("PRAGMA synchronous").fetchone()[0]]}


@contextlib.contextmanager
def _setup(conn):
    """The puts before the clock starts: no fsync per put; the peer's own setting after."""
    own = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA synchronous = OFF")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA synchronous = {own}")


def _timed(cycle, jobs):
    started = time.perf_counter()
    done = 0
    for _ in range(jobs):
        if not cycle():
            break
        done += 1
    seconds = time.perf_counter() - started
    return {"jobs": done, "seconds": seconds, "cycles_per_s": done / seconds}


def persist_queue(directory, jobs):
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(str(Path(directory) / "persist-queue"), multithreading=False)
    try:
        with _setup(queue._putter):
            for number in range(jobs):
                queue.put({"i": number})

        def cycle():
            item = queue.get(block=False, raw=True)
            return queue.ack(id=item["pqid"]) is not None
        result = _timed(cycle, jobs)
        return {"peer": "persist-queue", "version": persistqueue.__version__, **result, **_pragmas(queue._getter)}
    finally:
        queue.close()


def litequeue(directory, jobs):
    import litequeue

    queue = litequeue.LiteQueue(str(Path(directory) / "litequeue.db"))
    try:
        with _setup(queue.conn):
            for number in range(jobs):
                queue.put(json.dumps({"i": number}))

        def cycle():
            message = queue.pop()
            return message is not None and queue.done(message.message_id) is not None
        result = _timed(cycle, jobs)
        return {"peer": "litequeue", "version": litequeue.__version__, **result, **_pragmas(queue.conn)}
    finally:
        queue.conn.close()


def huey(directory, jobs):
    from importlib.metadata import version

    from huey import SqliteHuey

    queue = SqliteHuey("bench", filename=str(Path(directory) / "huey.db"))
    storage = queue.storage
    try:
        with _setup(storage.conn):
            for number in range(jobs):
                storage.enqueue(json.dumps({"i": number}).encode())

        def cycle():
            return storage.dequeue() is not None
        result = _timed(cycle, jobs)
        return {"peer": "huey", "version": version("huey"), **result, **_pragmas(storage.conn)}
    finally:
        storage.close()


def all_peers(directory, jobs):
    out = {}
    for name, function in (("persist-queue", persist_queue), ("litequeue", litequeue), ("huey", huey)):
        try:
            out[name] = function(directory, jobs)
        except (ImportError, sqlite3.Error, RuntimeError, OSError) as exc:
            out[name] = {"peer": name, "error": repr(exc)}
    return out

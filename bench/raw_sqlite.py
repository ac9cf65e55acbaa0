"""The physical limit: plain sqlite3, in-process, one connection, WAL, the same pragmas as
sdm_peer.store.connect (busy timeout, journal_mode=WAL, synchronous NORMAL or FULL).

One cycle = two transactions:
  BEGIN IMMEDIATE; UPDATE jobs SET status='STARTED', owner, token, expires
                   WHERE id = (first NOT STARTED by id) RETURNING id; COMMIT
  BEGIN IMMEDIATE; UPDATE jobs SET status='DONE', result, lease cleared
                   WHERE id = ? AND token = ? AND status='STARTED'; COMMIT
(the least a lease needs: the token is checked, by primary key, with no index to maintain).
The jobs are inserted before the clock starts. `renew` is one more figure: one
`UPDATE jobs SET expires = ? WHERE id = ? AND token = ? AND status = 'STARTED'` per transaction."""

import secrets
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL DEFAULT 'NOT STARTED', owner TEXT,
                   token TEXT, expires REAL, params TEXT NOT NULL, result TEXT);
CREATE INDEX jobs_claimable ON jobs (id) WHERE status = 'NOT STARTED';
"""
CLAIM = """UPDATE jobs SET status = 'STARTED', owner = ?, token = ?, expires = ?
           WHERE id = (SELECT id FROM jobs WHERE status = 'NOT STARTED' ORDER BY id LIMIT 1) RETURNING id"""
COMPLETE = ("UPDATE jobs SET status = 'DONE', result = ?, owner = NULL, token = NULL, expires = NULL"
            " WHERE id = ? AND token = ? AND status = 'STARTED'")
RENEW = "UPDATE jobs SET expires = ? WHERE id = ? AND token = ? AND status = 'STARTED'"


def connect(path, synchronous):
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def transaction(conn, sql, args):
    conn.execute("BEGIN IMMEDIATE")
    row = conn.execute(sql, args).fetchone()
    conn.execute("COMMIT")
    return row


def cycles(directory, jobs, synchronous, *, max_seconds=None, renew=True, name=None):
    """Claim+complete cycles per second over `jobs` jobs (or as many as `max_seconds` allow),
    and with `renew`, renew transactions per second over min(jobs, 10,000) held leases."""
    path = Path(directory) / f"{name or 'raw-' + synchronous.lower()}.db"
    conn = connect(str(path), synchronous)
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO jobs (params) VALUES (?)", (('{"i": %d}' % i,) for i in range(jobs)))
    conn.execute("COMMIT")
    started = time.perf_counter()
    done = 0
    deadline = None if max_seconds is None else started + max_seconds
    for _ in range(jobs):
        if deadline is not None and time.perf_counter() > deadline:
            break
        token = secrets.token_urlsafe(18)
        row = transaction(conn, CLAIM, ("worker", token, time.time() + 60))
        if row is None:
            break
        transaction(conn, COMPLETE, ("{}", row[0], token))
        done += 1
    seconds = time.perf_counter() - started
    result = {"jobs": done, "synchronous": synchronous, "seconds": seconds, "cycles_per_s": done / seconds}
    if renew:
        result["renew_per_s"] = _renewals(conn, min(jobs, 10_000))
    conn.close()
    path.unlink()
    return result


def _renewals(conn, held):
    conn.execute("BEGIN")
    first = conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0] + 1
    conn.executemany("INSERT INTO jobs (id, params, status, owner, token, expires)"
                     " VALUES (?, '{}', 'STARTED', 'w', ?, 0)", ((first + i, f"t{i}") for i in range(held)))
    conn.execute("COMMIT")
    started = time.perf_counter()
    for i in range(held):
        transaction(conn, RENEW, (time.time() + 60, first + i, f"t{i}"))
    return held / (time.perf_counter() - started)

"""Every SQL statement and every state transition of sdm-peer (DESIGN §3).

Nothing else touches the database. Each transition is one `BEGIN IMMEDIATE` transaction and
takes the server's clock as `now` (seconds since the epoch), so tests move time instead of
sleeping. Lease times leave this module as seconds remaining, never as clock values.

Every statement is named (SQL); every move of a status or state runs through `Store._move`,
which checks it against the transition tables of states.py, whose sources are the UPDATE's guard.
A guarded change that matches no row is a refusal (`LeaseLost`), never a silent no-op. A refusal
that records something (a late result kept in its attempt row) commits that record first.
"""

import contextlib
import functools
import json
import re
import secrets
import sqlite3
from importlib import resources
from pathlib import Path

import sqlite_utils

from . import prices
from .providers.base import CAPACITY, run_zones
from . import settings as settings_mod
from . import states as st
from .errors import BadInput, LeaseLost, NoSuchConfig, SdmPeerError

SCHEMA_VERSION = 7
NOT_HELD = "this lease is no longer held: the experiment was taken back or finished"
BUSY_TIMEOUT_MS = 10_000
WAL_CHECKPOINT_PAGES = 4000  # 16 MiB of WAL between automatic checkpoints (SQLite's default: 1000)
ERROR_TAIL_CHARS = 4000
# Shrinking (the `shrink` setting): a worker with nothing to claim leaves its group only while
# more than this many workers of its config are idle. The reserve re-runs leases that lapse
# (a preempted VM's) at once, without waiting for the group to re-create a VM and boot it.
IDLE_RESERVE = 1


def schema_sql():
    """The text of schema.sql, installed as package data: the one copy of the schema."""
    return resources.files("sdm_peer").joinpath("schema.sql").read_text()


def _sql_list(values):
    # Statuses are module constants, never user input; literal lists let the planner use
    # the partial indexes of schema.sql, which a bound parameter would hide from it.
    return "(" + ", ".join("'" + value.replace("'", "''") + "'" for value in values) + ")"


def _is(column, values):
    """`column = 'V'` for one value, `column IN ('V', ...)` for more: SQLite matches a partial
    index's `WHERE status = 'V'` only to the same `=` term, never to `status IN ('V')`."""
    return f"{column} = {_sql_list(values)[1:-1]}" if len(values) == 1 else f"{column} IN {_sql_list(values)}"


# Of an event `e`: it came after its config's group was last made (or the config never had one).
SINCE_MADE = ("e.id > COALESCE((SELECT MAX(m.id) FROM events m WHERE m.config = e.config"
              " AND m.kind = 'group_provisioned'), 0)")
UNFINISHED_SQL = _sql_list(st.UNFINISHED)
UNSUCCESSFUL_SQL = _sql_list(st.UNSUCCESSFUL)
IS_STARTED = _is("status", (st.STARTED,))

# Where an attempt ran (DESIGN §9): the `host` object of complete/fail, field -> column type.
HOST_FIELDS = {"cpu_model": "TEXT", "cpus": "TEXT", "confinement": "TEXT", "steal_seconds": "REAL",
               "max_rss_mb": "REAL", "cpu_platform": "TEXT", "boot_to_claim_seconds": "REAL"}
HOST_COLUMNS = tuple(f"host_{name}" for name in HOST_FIELDS)
_SET_HOST = "".join(f", {column} = :{column}" for column in HOST_COLUMNS)

# The schema version whose attempts have the host_* columns (an older file read as it is has none).
HOST_COLUMNS_SINCE = 5

# Every statement that reads or writes rows, by name (procrastinate's named queries): a method
# runs `SQL[name]`, and a test can EXPLAIN QUERY PLAN each hot one. Statements that move rows
# from one status or state to another are in MOVES below and join this table by their names.
QUERIES = {
    # ------------------------------------------------------------ settings and plan
    "settings": "SELECT key, value FROM settings",
    "checkpoint": "PRAGMA wal_checkpoint(PASSIVE)",
    "setting": "SELECT value FROM settings WHERE key = ?",
    "setting_put": "INSERT INTO settings (key, value) VALUES (?, ?)"
                   " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "config_of_shape": "SELECT id, name, state, cores, memory_gb FROM configs WHERE cores = ? AND memory_gb = ?",
    "config_names": "SELECT name FROM configs ORDER BY sequence LIMIT 8",
    "config_add": "INSERT INTO configs (name, cores, memory_gb, sequence, group_size)"
                  " VALUES (?, ?, ?, (SELECT COALESCE(MAX(sequence), 0) + 1 FROM configs), ?) RETURNING id",
    "experiment_add": "INSERT INTO experiments (key, config, params, updated_at) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT (key) DO NOTHING",
    # ------------------------------------------------------------ workers
    "worker_touch": "INSERT INTO workers (id, cores, memory_gb, first_seen, last_seen) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET cores = excluded.cores, memory_gb = excluded.memory_gb,"
                    " last_seen = excluded.last_seen",
    "worker_renewed": "UPDATE workers SET last_seen = ? WHERE id = ?",
    "worker_seen": "UPDATE workers SET last_seen = MAX(last_seen, ?) WHERE id = ?",
    "idle_workers": f"""SELECT COUNT(*) FROM workers w
        WHERE w.cores = :cores AND w.memory_gb = :memory_gb AND w.last_seen >= :since
          AND NOT EXISTS (SELECT 1 FROM departures d WHERE d.worker = w.id)
          AND NOT EXISTS (SELECT 1 FROM experiments e WHERE e.config = :config
                          AND e.{IS_STARTED} AND e.lease_owner = w.id)""",
    "departure_add": "INSERT INTO departures (worker, config, left_at) VALUES (?, ?, ?)",
    "departure_cancel": "DELETE FROM departures WHERE worker = ?",
    "config_vm_left": "UPDATE configs SET vms = MAX(vms - 1, 0) WHERE id = ?",
    # ------------------------------------------------------------ leases
    # The claim query; its WHERE clause matches the partial index `experiments_claimable`.
    "claim_next": f"""SELECT id, key, params, attempts FROM experiments
        WHERE config = :config AND {_is("status", st.leaving(st.EXPERIMENT_TRANSITIONS, "claim"))}
        ORDER BY id LIMIT 1""",
    "attempt_add": "INSERT INTO attempts (experiment, number, worker, lease_token, claimed_at) VALUES (?, ?, ?, ?, ?)",
    "expired_leases": f"SELECT id, config, lease_token, lease_owner FROM experiments"
                      f" WHERE config = ? AND {IS_STARTED} AND lease_expires_at <= ?",
    "next_expiry": f"SELECT MIN(lease_expires_at) FROM experiments WHERE config = ? AND {IS_STARTED}",
    "leases_of_token": f"SELECT id, config, lease_token, lease_owner FROM experiments"
                       f" WHERE lease_token = ? AND {IS_STARTED}",
    "leases_of_worker": f"SELECT id, config, lease_token, lease_owner FROM experiments"
                        f" WHERE lease_owner = ? AND {IS_STARTED}",
    "attempt_end": f"""UPDATE attempts SET outcome = :outcome, ended_at = :now, wall_seconds = :wall,
                       exit_code = :exit_code, error = :error{_SET_HOST}
                   WHERE lease_token = :token AND outcome IS NULL RETURNING worker""",
    "attempt_of_lease": "SELECT a.outcome, e.status FROM attempts a JOIN experiments e ON e.id = a.experiment"
                        " WHERE a.lease_token = ?",
    "attempt_lost": f"""UPDATE attempts SET outcome = :outcome, wall_seconds = :wall, exit_code = :exit_code,
                        error = :error, result = :result{_SET_HOST} WHERE lease_token = :token""",
    # ------------------------------------------------------------ configs and hand-off
    # Named statuses, not NOT IN: a seek per status in experiments_config_status, instead of a
    # walk over every finished row of the config.
    "config_unfinished": f"SELECT EXISTS (SELECT 1 FROM experiments WHERE config = ? AND status IN {UNFINISHED_SQL})",
    "config_progress": "SELECT name, state FROM configs WHERE id = ?",
    "handed_off": "SELECT EXISTS (SELECT 1 FROM events WHERE kind = 'handoff' AND json_extract(detail, '$.from') = ?)",
    # When the earliest outstanding provisioning lease lapses; configs_provisioning holds exactly those.
    "pending_provision": "SELECT MIN(provision_expires_at) FROM configs WHERE provision_expires_at IS NOT NULL",
    "provision_lapsed": "SELECT id, cores, group_size, vms FROM configs WHERE provision_expires_at <= ?"
                        " ORDER BY sequence",
    "provision_takeover": """UPDATE configs SET provision_owner = :owner, provision_token = :token,
            provision_expires_at = :expires, vms = :vms
        WHERE id = :id RETURNING name, cores, memory_gb, vms, provision_token, zone, standard""",
    "provision_renew": "UPDATE configs SET provision_expires_at = ? WHERE provision_token = ?"
                       " AND provision_expires_at IS NOT NULL RETURNING id",
    "provision_of_token": "SELECT id, name, provisioned_at FROM configs WHERE provision_token = ?",
    "provision_made": "UPDATE configs SET provisioned_at = ?, provision_expires_at = NULL WHERE id = ?",
    "provision_extend": "UPDATE configs SET provision_expires_at = MAX(provision_expires_at, :now) + :seconds"
                        " WHERE provision_expires_at IS NOT NULL",
    "provision_held": "SELECT id, name, zone, standard FROM configs WHERE provision_token = ?"
                      " AND provision_expires_at IS NOT NULL",
    # A group out of capacity, tried again at once elsewhere (another zone, or standard VMs) by
    # the same holder: its lease renewed, its vCPUs kept.
    "provision_moved": """UPDATE configs SET zone = :zone, standard = :standard, provision_expires_at = :expires
        WHERE id = :id RETURNING name, cores, memory_gb, vms, provision_token, zone, standard""",
    "config_zone_reset": "UPDATE configs SET zone = NULL WHERE id = ?",
    # The first try at the config's group since it was last made: its hand-off, or the first
    # take-over or failure of a config handed off before.
    "first_try": "SELECT MIN(e.at) FROM events e WHERE e.config = ?"
                 f" AND e.kind IN ('handoff', 'provision_takeover', 'group_failed') AND {SINCE_MADE}",
    # A lease given up after its group could not run: a fresh token (the old holder's reports
    # are refused), nobody holding it, and a lapse at the retry time.
    # Its vCPUs are given back meanwhile (the quota may be used elsewhere): vms 0.
    "provision_give_up": "UPDATE configs SET provision_owner = NULL, provision_token = ?, provision_expires_at = ?,"
                         " vms = 0 WHERE id = ?",
    # The next config to hand off, and what the groups hold of max_vcpus (DESIGN §8).
    "next_waiting": f"SELECT id, cores, group_size FROM configs WHERE state = '{st.WAITING}' ORDER BY sequence LIMIT 1",
    "vcpus_in_use": f"SELECT COALESCE(SUM(cores * vms), 0) FROM configs"
                    f" WHERE state IN {_sql_list((st.PROVISIONING, st.RUNNING))}",
    # Spend (DESIGN §8): each worker's seconds alive (first to last call, a minute at least) by
    # shape and model: a worker first seen once its config's group was made standard (the
    # spot_fallback event) is a standard VM, the others spot where the run asks for spot.
    "alive_by_shape": """WITH standard_since AS (
            SELECT c.cores, c.memory_gb, (SELECT MIN(e.at) FROM events e
                                          WHERE e.config = c.name AND e.kind = 'spot_fallback') AS at
            FROM configs c WHERE c.standard = 1)
        SELECT w.cores, w.memory_gb, COALESCE(w.first_seen >= s.at, 0) AS standard,
               SUM(MAX(w.last_seen - w.first_seen, :minimum)) AS seconds
        FROM workers w LEFT JOIN standard_since s ON s.cores = w.cores AND s.memory_gb = w.memory_gb
        GROUP BY w.cores, w.memory_gb, standard""",
    "run_started": "SELECT MIN(at) FROM events",
    "last_budget_event": "SELECT detail FROM events WHERE config IS NULL AND kind = 'budget' ORDER BY id DESC LIMIT 1",
    "leases_of_config": f"SELECT EXISTS (SELECT 1 FROM experiments WHERE config = ? AND {IS_STARTED})",
    "group_failures": f"SELECT COUNT(*) FROM events e WHERE e.config = ? AND e.kind = 'group_failed' AND {SINCE_MADE}",
    "configs_active": f"SELECT EXISTS (SELECT 1 FROM configs"
                      f" WHERE state IN {_sql_list((st.PROVISIONING, st.RUNNING))})",
    "config_state": "SELECT state FROM configs WHERE name = ?",
    # ------------------------------------------------------------ events
    "event_add": "INSERT INTO events (at, kind, config, worker, detail) VALUES (?, ?, ?, ?, ?)",
    "group_deleted_seen": "SELECT EXISTS (SELECT 1 FROM events WHERE kind = 'group_deleted' AND config = ?)",
    "events": "SELECT at, kind, config, worker, detail FROM events ORDER BY id",
    "events_of_kind": "SELECT at, kind, config, worker, detail FROM events WHERE kind = ? ORDER BY id",
    # ------------------------------------------------------------ reading
    "status_configs": "SELECT id, name, cores, memory_gb, sequence, group_size, vms, state, zone, standard FROM configs"
                      " ORDER BY sequence",
    "status_counts": "SELECT config, status, COUNT(*) FROM experiments GROUP BY config, status",
    "status_expired": f"SELECT config, COUNT(*) FROM experiments WHERE {IS_STARTED}"
                      f" AND lease_expires_at <= ? GROUP BY config",
    "attempts": "SELECT e.key, a.number, a.worker, a.claimed_at, a.ended_at, a.outcome, a.wall_seconds,"
                " a.exit_code, a.error, a.result FROM attempts a JOIN experiments e ON e.id = a.experiment"
                " ORDER BY a.id",
    "attempts_of_key": "SELECT e.key, a.number, a.worker, a.claimed_at, a.ended_at, a.outcome, a.wall_seconds,"
                       " a.exit_code, a.error, a.result FROM attempts a JOIN experiments e ON e.id = a.experiment"
                       " WHERE e.key = ? ORDER BY a.id",
    "experiments": """SELECT e.key, c.name AS config, c.cores, c.memory_gb, e.status, e.attempts, e.failures,
                          e.interruptions, e.wall_seconds, e.failed_reason, e.params, e.result
                   FROM experiments e JOIN configs c ON c.id = e.config ORDER BY c.sequence, e.id""",
    # Per experiment, where its latest ended attempt ran (export's host_* columns, the report's flags).
    "experiment_hosts": f"""SELECT e.key, {", ".join("a." + column for column in HOST_COLUMNS)}
                        FROM attempts a JOIN experiments e ON e.id = a.experiment
                        WHERE a.id IN (SELECT MAX(id) FROM attempts WHERE outcome IS NOT NULL GROUP BY experiment)""",
    "leases": f"""SELECT e.key, c.name AS config, e.lease_owner AS worker, a.number AS attempt,
                     e.lease_expires_at - :now AS seconds_left, :now - a.claimed_at AS running_seconds
              FROM experiments e JOIN configs c ON c.id = e.config JOIN attempts a ON a.lease_token = e.lease_token
              WHERE e.{IS_STARTED} ORDER BY e.lease_expires_at LIMIT :limit""",
    "provisioning": f"""SELECT c.name AS config, c.provision_owner AS owner, c.provision_expires_at - ? AS seconds_left,
                        (SELECT json_extract(e.detail, '$.error') FROM events e WHERE e.config = c.name
                         AND e.kind = 'group_failed' AND {SINCE_MADE} ORDER BY e.id DESC LIMIT 1) AS error
                    FROM configs c WHERE c.state = '{st.PROVISIONING}' OR c.provision_expires_at IS NOT NULL
                    ORDER BY c.sequence""",
    "recent_events": "SELECT at, kind, config, worker, NULL AS key, detail FROM events WHERE kind != 'config_added'"
                     " ORDER BY id DESC LIMIT ?",
    "recent_attempts": f"""SELECT a.ended_at AS at, lower(a.outcome) AS kind, c.name AS config, a.worker, e.key,
                              a.exit_code, a.error
                       FROM attempts a JOIN experiments e ON e.id = a.experiment JOIN configs c ON c.id = e.config
                       WHERE a.outcome IN {UNSUCCESSFUL_SQL} ORDER BY a.ended_at DESC LIMIT ?""",
    "timings_per_config": f"SELECT c.name, COUNT(e.wall_seconds) AS n, AVG(e.wall_seconds) AS mean FROM experiments e"
                          f" JOIN configs c ON c.id = e.config WHERE e.status = '{st.DONE}' GROUP BY c.id",
    "timings_recent": f"SELECT COUNT(*) FROM attempts WHERE outcome = '{st.DONE}' AND ended_at > ?",
    "first_claim": "SELECT claimed_at FROM attempts ORDER BY id LIMIT 1",
    "attempt_history": """SELECT c.name AS config, c.cores, c.memory_gb, a.outcome, COUNT(a.id) AS count,
                                 COALESCE(SUM(COALESCE(a.wall_seconds, a.ended_at - a.claimed_at)), 0) AS seconds
                          FROM configs c LEFT JOIN experiments e ON e.config = c.id
                          LEFT JOIN attempts a ON a.experiment = e.id
                          GROUP BY c.id, a.outcome ORDER BY c.sequence""",
    "idle_accounting": """WITH alive AS (
            SELECT c.id, COUNT(w.id) AS workers, COALESCE(SUM(w.last_seen - w.first_seen), 0) AS seconds
            FROM configs c LEFT JOIN workers w ON w.cores = c.cores AND w.memory_gb = c.memory_gb
            GROUP BY c.id),
        busy AS (
            SELECT e.config AS id, SUM(COALESCE(a.wall_seconds, COALESCE(a.ended_at, :now) - a.claimed_at)) AS seconds
            FROM attempts a JOIN experiments e ON e.id = a.experiment GROUP BY e.config)
        SELECT c.name AS config, alive.workers, alive.seconds AS worker_seconds,
               COALESCE(busy.seconds, 0) AS busy_seconds
        FROM configs c JOIN alive ON alive.id = c.id LEFT JOIN busy ON busy.id = c.id
        ORDER BY c.sequence""",
    "integrity_check": "PRAGMA integrity_check",
    # ------------------------------------------------------------ opening an older database
    "table_definition": "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
    "table_columns": "SELECT name FROM pragma_table_info(?)",
    "objects_on_table": "SELECT type, name FROM sqlite_master WHERE tbl_name = ? AND type IN ('index', 'trigger')"
                        " AND sql IS NOT NULL",
}

# Tables no other table refers to, rebuilt when an older database's definition differs from
# schema.sql's (a CHECK list that grew, which SQLite cannot alter; new columns), their rows kept:
# one way to bring any older file up to date.
REBUILT_WHEN_CHANGED = ("events", "attempts")
# Tables others refer to, which cannot be rebuilt: an older database's gets schema.sql's new columns.
EXTENDED_WHEN_CHANGED = ("configs",)

# Taking a lease back, released or expired: INTERRUPTED or NOT STARTED, FAILED once the
# interruption budget is spent.
_INTERRUPT = """UPDATE experiments SET
        interruptions = interruptions + 1,
        status = CASE WHEN interruptions + 1 >= :max THEN :gave_up ELSE :to END,
        failed_reason = CASE WHEN interruptions + 1 >= :max
            THEN 'interrupted ' || (interruptions + 1) || ' times (max_interruptions)' END,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = :now
    WHERE id = :id AND lease_token = :token AND {leaving} RETURNING id"""

# The statements that move rows: name -> (table, event of its transition table, text). The
# text's `{leaving}` becomes the guard the event's sources give; the status it writes is bound
# as :to (and :gave_up: FAILED, when a budget ran out), so it writes only what _move checked.
# Renewals write no status (a rewritten status would rewrite four indexes on every renewal).
MOVES = {
    # The first claimable experiment of the config, found and leased in one statement (its
    # subquery is claim_next's, a seek in the partial index `experiments_claimable`).
    "claim": ("experiments", "claim", """UPDATE experiments SET status = :to, lease_owner = :worker,
            lease_token = :token, lease_expires_at = :expires, attempts = attempts + 1, updated_at = :now
        WHERE id = (SELECT id FROM experiments WHERE config = :config AND {leaving} ORDER BY id LIMIT 1)
        RETURNING id, key, params, attempts"""),
    # A lease the worker already holds in the config, handed to it again.
    "reissue": ("experiments", "renew", """UPDATE experiments SET lease_expires_at = :expires, updated_at = :now
        WHERE id = (SELECT id FROM experiments WHERE config = :config AND {leaving}
                    AND lease_owner = :worker ORDER BY id LIMIT 1)
        RETURNING key, params, lease_token, attempts"""),
    "renew": ("experiments", "renew", """UPDATE experiments SET lease_expires_at = :expires, updated_at = :now
        WHERE lease_token = :token AND {leaving} RETURNING lease_owner"""),
    "extend_leases": ("experiments", "renew", """UPDATE experiments
        SET lease_expires_at = MAX(lease_expires_at, :now) + :seconds WHERE {leaving} RETURNING id"""),
    "complete": ("experiments", "complete", """UPDATE experiments SET status = :to, result = :result,
            wall_seconds = :wall, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = :now
        WHERE lease_token = :token AND {leaving} RETURNING id, config"""),
    "fail": ("experiments", "fail", """UPDATE experiments SET
            failures = failures + 1,
            status = CASE WHEN failures + 1 >= :max THEN :gave_up ELSE :to END,
            failed_reason = CASE WHEN failures + 1 >= :max
                THEN 'failed ' || (failures + 1) || ' times (max_failures): ' || :error END,
            wall_seconds = :wall, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = :now
        WHERE lease_token = :token AND {leaving} RETURNING id, config, status"""),
    "release": ("experiments", "release", _INTERRUPT),
    "expire": ("experiments", "expire", _INTERRUPT),
    "config_handoff": ("configs", "handoff", """UPDATE configs SET state = :to, provision_owner = :owner,
            provision_token = :token, provision_expires_at = :expires, vms = :vms
        WHERE id = :id AND {leaving} RETURNING name, cores, memory_gb, vms, provision_token, zone, standard"""),
    "config_first_claim": ("configs", "first_claim", "UPDATE configs SET state = :to WHERE id = :id AND {leaving}"
                                                     " RETURNING id"),
    "config_finish": ("configs", "finish", """UPDATE configs SET state = :to, done_at = :now,
            provision_expires_at = NULL WHERE id = :id AND {leaving} RETURNING name"""),
    "config_reopen": ("configs", "reopen", f"""UPDATE configs SET state = :to, done_at = NULL
        WHERE {{leaving}} AND EXISTS (SELECT 1 FROM experiments e WHERE e.config = configs.id
                                      AND e.status IN {UNFINISHED_SQL})
        RETURNING name"""),
}

# table -> (its status column, its transition table)
TRANSITION_TABLES = {"experiments": ("status", st.EXPERIMENT_TRANSITIONS),
                     "configs": ("state", st.CONFIG_TRANSITIONS)}


def _guarded(table, event, text):
    column, transitions = TRANSITION_TABLES[table]
    return text.replace("{leaving}", _is(column, st.leaving(transitions, event)))


SQL = {**QUERIES, **{name: _guarded(table, event, text) for name, (table, event, text) in MOVES.items()}}

# The claim's check that spares the config's UPDATE on all but its first claim.
FIRST_CLAIM_FROM = st.leaving(st.CONFIG_TRANSITIONS, "first_claim")


def connect(path, *, autocheckpoint=True, durable=False):
    """Open the database with the pragmas every connection needs.

    WAL lets readers run beside the one writer. With synchronous=NORMAL a committed transaction
    survives the process being killed but not a power cut of the machine (the last commits can
    roll back; their experiments run again); `durable` (synchronous=FULL) makes every
    acknowledged report survive that too, at one fsync per commit. Without `autocheckpoint`
    the commits of this connection never checkpoint: Litestream does (it owns checkpointing),
    or the server, beside its writer (Store.checkpoint)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    # A checkpoint copies each page changed since the last one once and syncs the file: fewer,
    # larger checkpoints copy the hot pages (indexes, the workers table) fewer times.
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES if autocheckpoint else 0}")
    return conn


def connect_readonly(path):
    """A connection whose every write SQLite itself refuses (the dashboard's, the report's).
    It reads the writer's commits through the WAL and never takes the write lock."""
    conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                           timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")
    return conn


def _number(value):
    """16.0 -> 16: shapes read back as the user wrote them."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def config_name(cores, memory_gb):
    return f"c{cores}-m{_number(memory_gb)}"


class Store:
    """The lease store over one SQLite file. One instance per thread of use."""

    def __init__(self, path, *, autocheckpoint=True, durable=False, create=True, readonly=False):
        path = Path(path)
        if (readonly or not create) and not path.exists():
            raise SdmPeerError(f"{path}: no such database", hint="create it with `sdm-peer init`")
        self.path = path
        self._batching = False
        try:
            self.conn = (connect_readonly(path) if readonly
                         else connect(str(path), autocheckpoint=autocheckpoint, durable=durable))
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:  # a missing directory, a file that is not a database
            raise SdmPeerError(f"{path}: cannot open the database: {exc}") from None
        if readonly and version == 0:  # an older version reads fine: schema changes only add
            self.conn.close()
            raise SdmPeerError(f"{path}: not an sdm-peer database")
        self.version = version
        if not readonly and version != SCHEMA_VERSION:
            with self._write() as db:
                set_aside = [_set_aside_if_changed(db, table) for table in REBUILT_WHEN_CHANGED]
                for statement in _statements(schema_sql()):
                    db.execute(statement)
                for table, old in zip(REBUILT_WHEN_CHANGED, set_aside):
                    if old is not None:
                        _move_rows(db, old, table)
                for table in EXTENDED_WHEN_CHANGED:
                    _add_new_columns(db, table)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.version = SCHEMA_VERSION
        self.settings = self.load_settings()

    def close(self):
        self.conn.close()

    def checkpoint(self):
        """Copy what the WAL holds into the database file, as far as readers allow, without
        waiting for the writer (PASSIVE). Returns the WAL's frames and those now copied."""
        _, frames, copied = self.conn.execute(SQL["checkpoint"]).fetchone()
        return {"frames": frames, "copied": copied}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so two
        writers queue on the busy timeout instead of failing half-way. Inside a batch it is a
        savepoint: it still succeeds or fails whole, and commits with the batch."""
        if self._batching:
            self.conn.execute("SAVEPOINT transition")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK TO transition")
                self.conn.execute("RELEASE transition")
                raise
            self.conn.execute("RELEASE transition")
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def batch(self):
        """Group commit: the transitions run inside this block share one transaction, one
        commit and (when durable) one fsync. Each still succeeds or fails on its own; if the
        commit fails, every one of them is lost together (the caller answers each with an error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._batching = True
        try:
            yield self
            self._batching = False
            self.conn.execute("COMMIT")
        except BaseException:
            self._batching = False
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self):
        """A short read transaction: one consistent snapshot for a multi-query read (inside a
        batch, the batch's own transaction is that snapshot)."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    # ---------------------------------------------------------------- settings and plan

    def load_settings(self):
        rows = self.conn.execute(SQL["settings"]).fetchall()
        return settings_mod.with_defaults({row["key"]: json.loads(row["value"]) for row in rows})

    def import_plan(self, plan, *, settings=None, now):
        """Add a parsed plan's configs and experiments, and store settings, in one transaction.

        Existing experiments are never touched; a key already present is skipped. A config that
        was DONE and gets new experiments is reopened (WAITING) so they run. Returns counts."""
        settings = settings or {}
        added_configs = added_experiments = 0
        with self._write() as db:
            db.executemany(SQL["setting_put"], [(key, json.dumps(value)) for key, value in settings.items()])
            group_size = self._setting(db, "group_size")
            config_ids = {}
            for config in plan.configs:
                row = db.execute(SQL["config_of_shape"], (config.cores, config.memory_gb)).fetchone()
                if row is None:
                    row = db.execute(
                        SQL["config_add"], (config_name(config.cores, config.memory_gb), config.cores, config.memory_gb,
                         config.group_size or group_size)).fetchone()
                    self._event(db, now, "config_added", config_name(config.cores, config.memory_gb))
                    added_configs += 1
                config_ids[config.name] = row["id"]
            before = db.total_changes
            db.executemany(
                SQL["experiment_add"],
                ((exp.key, config_ids[exp.config], json.dumps(exp.params), now) for exp in plan.experiments))
            added_experiments = db.total_changes - before
            reopened = self._move(db, "config_reopen", {}, to=st.WAITING)
            for row in reopened:
                self._event(db, now, "config_reopened", row["name"])
        self.settings = self.load_settings()
        return {"configs_added": added_configs, "experiments_added": added_experiments,
                "configs_reopened": len(reopened)}

    def set_lease_seconds(self, seconds):
        """Make `seconds` the run's lease period (the `lease_seconds` setting): a server started
        with another period stores it, so the period it grants and the settings agree."""
        with self._write() as db:
            db.execute("INSERT INTO settings (key, value) VALUES ('lease_seconds', ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(seconds),))
        self.settings = self.load_settings()

    def _setting(self, db, key):
        row = db.execute(SQL["setting"], (key,)).fetchone()
        return json.loads(row["value"]) if row else settings_mod.DEFAULTS.get(key)

    # ---------------------------------------------------------------- worker transitions

    def hello(self, worker_id, cores, memory_gb, *, now):
        with self._write() as db:
            self._touch_worker(db, worker_id, cores, memory_gb, now)
            config = self._config_for_shape(db, cores, memory_gb)
        return {"config": config["name"], "settings": dict(self.settings)}

    def claim(self, worker_id, cores, memory_gb, *, now, lease_seconds):
        """Claim the next experiment of the worker's shape.

        Expired leases of that config are taken back first (lazily: no reaper is needed). At
        the budget (budget_usd) nothing is claimed: `stop` says why, and `remove_group` whether
        the config's group may go (none of its workers still runs an experiment).
        Returns {experiment, config, config_done, handoff_pending, retry_after, provision,
        provisions, leave, stop}."""
        with self._write() as db:
            self._touch_worker(db, worker_id, cores, memory_gb, now)
            if self.settings["shrink"]:  # a departed worker asking again did not leave after all
                db.execute(SQL["departure_cancel"], (worker_id,))
            config = self._config_for_shape(db, cores, memory_gb)
            provisions = []
            if config["state"] != st.CONFIG_DONE:
                provisions += self._reclaim_expired(db, config["id"], now, worker_id)
            experiment = self._held_by(db, config["id"], worker_id, now, lease_seconds)
            stop = None if experiment else self._budget_stop(db, now)
            if stop is not None:
                return {**_provisions(provisions), **self._progress(db, config["id"], now), "experiment": None,
                        "leave": False, "stop": stop,
                        "remove_group": not db.execute(SQL["leases_of_config"], (config["id"],)).fetchone()[0]}
            if experiment is None:
                experiment = self._start(db, config, worker_id, now, lease_seconds)
                if experiment is not None and self.settings["prewarm"]:
                    provisions += self._prewarm(db, config, worker_id, now)
            if not provisions:
                provisions = [provision for provision in [self._take_over_provisioning(db, worker_id, now)]
                              if provision is not None]
            if experiment is not None:  # nothing to wait for
                return {"experiment": experiment, **_provisions(provisions), "config": config["name"],
                        "config_done": False, "handoff_pending": self._pending_provision(db) is not None,
                        "retry_after": None, "leave": False, "stop": None}
            answer = self._progress(db, config["id"], now)
            answer["leave"] = (self.settings["shrink"] and not answer["config_done"]
                               and self._leave_group(db, config, worker_id, now))
            if answer["leave"] and self._max_vcpus(db) is not None:
                # Its VM's vCPUs are free: the next configs' groups boot during this one's tail.
                db.execute(SQL["config_vm_left"], (config["id"],))
                provisions += self._hand_off(db, worker_id, now, source=config["name"], prewarm=True)
        return {"experiment": experiment, **_provisions(provisions), **answer, "stop": None}

    def _prewarm(self, db, config, worker_id, now):
        """The claim that took the config's last claimable experiment hands off the next WAITING
        config now, so its group boots while this one's tail runs. At most once per config: an
        ERROR or a lapsed lease can make the config claimable again, but the hand-off happened."""
        left = db.execute(SQL["claim_next"], {"config": config["id"]}).fetchone()
        if left is not None or self.settings["provider"] == "none" or self._handed_off(db, config["name"]):
            return []
        return self._hand_off(db, worker_id, now, source=config["name"], prewarm=True)

    @staticmethod
    def _handed_off(db, config_name):
        """Did this config already hand off the next one (pre-warming)?"""
        return db.execute(SQL["handed_off"], (config_name,)).fetchone()[0]

    def _leave_group(self, db, config, worker_id, now):
        """Shrinking: may this worker, which found nothing to claim, leave its group? Yes while
        more than IDLE_RESERVE of the config's workers are idle: seen within a lease period
        (an idle worker asks at least that often), holding no lease, not departed. A worker
        told to leave is recorded as departed in the same transaction, so two idle workers
        asking at once never both leave the reserve empty."""
        idle = db.execute(SQL["idle_workers"], {"cores": config["cores"], "memory_gb": config["memory_gb"],
                                                "config": config["id"],
                                                "since": now - self.settings["lease_seconds"]}).fetchone()[0]
        if idle <= IDLE_RESERVE:
            return False
        db.execute(SQL["departure_add"], (worker_id, config["id"], now))
        return True

    def _held_by(self, db, config_id, worker_id, now, lease_seconds):
        """A lease this worker already holds in the config, renewed. A worker claims only when
        it runs nothing, so such a lease is one whose claim answer never reached it (a dropped
        connection): it gets the same lease again instead of a second one left to lapse."""
        held = self._move(db, "reissue", {"expires": now + lease_seconds, "now": now, "config": config_id,
                                          "worker": worker_id}, to=st.STARTED)
        if not held:
            return None
        row = held[0]
        return {"key": row["key"], "params": json.loads(row["params"]), "lease_token": row["lease_token"],
                "lease_seconds_left": lease_seconds, "attempt": row["attempts"]}

    def _start(self, db, config, worker_id, now, lease_seconds):
        """Lease the config's first claimable experiment to the worker (None: nothing is claimable)."""
        token = secrets.token_urlsafe(18)
        moved = self._move(db, "claim", {"worker": worker_id, "token": token, "expires": now + lease_seconds,
                                         "now": now, "config": config["id"]}, to=st.STARTED)
        if not moved:
            return None
        (row,) = moved
        number = row["attempts"]
        db.execute(SQL["attempt_add"], (row["id"], number, worker_id, token, now))
        if config["state"] in FIRST_CLAIM_FROM:
            # A worker of this shape is proof that its group exists.
            self._move(db, "config_first_claim", {"id": config["id"]}, to=st.RUNNING,
                       refusal=st.IllegalTransition("config changed state inside its own write transaction"))
            self._event(db, now, "config_running", config["name"], worker_id)
        return {"key": row["key"], "params": json.loads(row["params"]), "lease_token": token,
                "lease_seconds_left": lease_seconds, "attempt": number}

    def _progress(self, db, config_id, now):
        """What a worker of this config should do when it got no experiment: wait, or stop."""
        config = db.execute(SQL["config_progress"], (config_id,)).fetchone()
        done = config["state"] == st.CONFIG_DONE
        next_expiry = db.execute(SQL["next_expiry"], (config_id,)).fetchone()[0]
        pending = self._pending_provision(db)
        waits = [moment - now for moment in (next_expiry, pending) if moment is not None]
        return {"config": config["name"], "config_done": done, "handoff_pending": pending is not None,
                "retry_after": max(0.0, min(waits)) if waits else None}

    def renew(self, *, now, lease_seconds, lease_token=None, provision_token=None):
        """Push a lease's expiry out. A lease that lapsed but was not yet taken back is still
        held: nobody else needed it, and the work goes on."""
        with self._write() as db:
            if provision_token is not None:
                seconds = self.settings["provision_lease_seconds"]
                row = db.execute(SQL["provision_renew"], (now + seconds, provision_token)).fetchone()
                if row is None:
                    raise LeaseLost("this provisioning lease is no longer held")
                return {"lease_seconds_left": seconds}
            (row,) = self._move(db, "renew", {"expires": now + lease_seconds, "now": now, "token": lease_token},
                                to=st.STARTED, refusal=LeaseLost(NOT_HELD))
            db.execute(SQL["worker_renewed"], (now, row["lease_owner"]))
        return {"lease_seconds_left": lease_seconds}

    def complete(self, lease_token, result, wall_seconds, *, now, host=None):
        if not isinstance(result, dict):
            raise SdmPeerError("a result must be a JSON object")
        result_json = json.dumps(result)
        with self._write() as db:
            moved = self._move(db, "complete", {"result": result_json, "wall": wall_seconds, "now": now,
                                                "token": lease_token}, to=st.DONE)
            if not moved:
                refusal = self._late_report(db, lease_token, st.DONE, now, wall_seconds=wall_seconds,
                                            exit_code=0, result=result_json, host=host)
            else:
                refusal = None
                worker = self._end_attempt(db, lease_token, st.DONE, now, wall_seconds=wall_seconds, exit_code=0,
                                           host=host)
                self._seen(db, worker, now)
                config_done, provisions = self._finish_if_complete(db, moved[0]["config"], now, worker)
        if refusal is not None:
            return self._refuse_or_repeat(refusal)
        return {"status": st.DONE, "config_done": config_done, **_provisions(provisions)}

    def fail(self, lease_token, error, exit_code, wall_seconds, *, now, host=None):
        """The command failed: ERROR (retried later) or FAILED once `max_failures` is reached."""
        error = (error or "")[-ERROR_TAIL_CHARS:]
        max_failures = self.settings["max_failures"]
        with self._write() as db:
            moved = self._move(db, "fail", {"max": max_failures, "error": error[-500:], "wall": wall_seconds,
                                            "now": now, "token": lease_token}, to=st.ERROR, gave_up=st.FAILED)
            if not moved:
                refusal = self._late_report(db, lease_token, st.ERROR, now, wall_seconds=wall_seconds,
                                            exit_code=exit_code, error=error, host=host)
            else:
                refusal = None
                worker = self._end_attempt(db, lease_token, st.ERROR, now, wall_seconds=wall_seconds,
                                           exit_code=exit_code, error=error, host=host)
                self._seen(db, worker, now)
                config_done, provisions = self._finish_if_complete(db, moved[0]["config"], now, worker)
        if refusal is not None:
            return self._refuse_or_repeat(refusal)
        return {"status": moved[0]["status"], "config_done": config_done, **_provisions(provisions)}

    def release(self, *, now, reason, lease_token=None, worker_id=None):
        """Give leases back (shutdown, SIGTERM, preemption): INTERRUPTED, or FAILED once
        `max_interruptions` is reached. By token, a lease not held is refused; by worker id,
        releasing nothing is fine (the shutdown script of an idle VM)."""
        query, value = ("leases_of_token", lease_token) if lease_token is not None else ("leases_of_worker", worker_id)
        with self._write() as db:
            rows = db.execute(SQL[query], (value,)).fetchall()
            if not rows and lease_token is not None:
                raise LeaseLost(NOT_HELD)
            for row in rows:
                # A stopping worker cannot provision: a hand-off its release causes goes to
                # whoever asks next, at once.
                self._interrupt(db, dict(row, lease_owner=None), st.INTERRUPTED, now,
                                reason=f"released: {reason}")
        return {"released": len(rows)}

    @staticmethod
    def _move(db, name, params, *, to, gave_up=None, refusal=None):
        """Run MOVES[name], which moves rows by one event of their transition table, to `to` (and
        to `gave_up` where a budget ran out). Its guard is the event's sources in the table; a
        target the table does not allow for the event is refused before anything runs. Returns
        the rows moved. None moved is a refusal when `refusal` names one, else an answer the
        caller acts on (nothing WAITING to hand off, no lease held by this worker)."""
        table, event, _ = MOVES[name]
        st.leaving(TRANSITION_TABLES[table][1], event, *((to,) if gave_up is None else (to, gave_up)))
        moved = db.execute(SQL[name], {**params, "to": to, "gave_up": gave_up}).fetchall()
        if not moved and refusal is not None:
            raise refusal
        return moved

    def _interrupt(self, db, row, outcome, now, *, reason):
        """Take a lease back from STARTED (released or expired); charge the interruption budget."""
        event, back_to = ("release", st.INTERRUPTED) if outcome == st.INTERRUPTED else ("expire", st.NOT_STARTED)
        self._move(db, event, {"max": self.settings["max_interruptions"], "now": now, "id": row["id"],
                               "token": row["lease_token"]}, to=back_to, gave_up=st.FAILED,
                   refusal=st.IllegalTransition("lease changed hands inside its own write transaction"))
        self._end_attempt(db, row["lease_token"], outcome, now, error=reason)
        return self._finish_if_complete(db, row["config"], now, row["lease_owner"])

    def _reclaim_expired(self, db, config_id, now, caller):
        """Take back every lapsed lease of one config. Returns the provisioning leases handed
        off if taking one back finished the config (its budget ran out on the last unfinished
        experiment)."""
        provisions = []
        rows = db.execute(SQL["expired_leases"], (config_id, now)).fetchall()
        for row in rows:
            row = dict(row, lease_owner=caller)  # the hand-off goes to whoever is here to take it
            provisions += self._interrupt(db, row, st.EXPIRED, now, reason="lease expired")[1]
        return provisions

    def _late_report(self, db, lease_token, outcome, now, **report):
        """A report for a lease that is not held. The same report again (a retry after a lost
        answer) is repeated harmlessly; a report after the lease was taken back is kept in its
        own attempt row as LOST, never over another attempt's."""
        attempt = db.execute(SQL["attempt_of_lease"], (lease_token,)).fetchone()
        if attempt is None:
            return LeaseLost("no such lease")
        if attempt["outcome"] == outcome:
            return {"status": attempt["status"], "duplicate": True}
        if attempt["outcome"] == st.EXPIRED:
            db.execute(SQL["attempt_lost"],
                       {"outcome": st.LOST, "wall": report.get("wall_seconds"), "exit_code": report.get("exit_code"),
                        "error": report.get("error"), "result": report.get("result"), "token": lease_token,
                        **_host_row(report.get("host"))})
        return LeaseLost("this lease is no longer held: the lease lapsed and the experiment was "
                         "taken back; the report is kept in its attempt row")

    @staticmethod
    def _refuse_or_repeat(refusal):
        if isinstance(refusal, Exception):
            raise refusal
        return {**refusal, "config_done": False, **_provisions([])}

    @staticmethod
    def _end_attempt(db, lease_token, outcome, now, *, wall_seconds=None, exit_code=None, error=None, host=None):
        """Record how an attempt ended (and where it ran); returns the worker that made it."""
        if outcome not in st.OUTCOMES:
            raise st.IllegalTransition(f"no attempt outcome {outcome!r}")
        ended = db.execute(SQL["attempt_end"], {"outcome": outcome, "now": now, "wall": wall_seconds,
                                                "exit_code": exit_code, "error": error, "token": lease_token,
                                                **_host_row(host)}).fetchone()
        if ended is None:
            raise st.IllegalTransition("an attempt ended twice")
        return ended["worker"]

    # ---------------------------------------------------------------- configs and hand-off

    def _finish_if_complete(self, db, config_id, now, caller):
        """If no experiment of the config is unfinished, mark it DONE and elect the caller to
        provision the next WAITING configs (exactly once: only the UPDATE that changed the
        state hands off). Returns (config_done, provisions)."""
        if db.execute(SQL["config_unfinished"], (config_id,)).fetchone()[0]:
            return False, []
        (finished,) = self._move(db, "config_finish", {"now": now, "id": config_id}, to=st.CONFIG_DONE,
                                 refusal=st.IllegalTransition("a DONE config had an unfinished experiment"))
        self._event(db, now, "config_done", finished["name"], caller)
        if self.settings["provider"] == "none":
            return True, []
        if self._max_vcpus(db) is None and self._handed_off(db, finished["name"]):
            return True, []  # one group at a time, and pre-warming handed off at the last claim
        return True, self._hand_off(db, caller, now, source=finished["name"])

    def _hand_off(self, db, owner, now, *, source, prewarm=False):
        """Provisioning leases on the next WAITING configs, in sequence order, held by `owner`
        (None: lapsed from the start, so that the next worker to ask takes them over). With
        `max_vcpus`, as many as its free vCPUs hold, each group made smaller to fit (never
        below one VM); without it, the next one (one group at a time). None at the budget."""
        if self._budget_stop(db, now) is not None:
            return []
        limit = self._max_vcpus(db)
        free = None if limit is None else limit - db.execute(SQL["vcpus_in_use"]).fetchone()[0]
        expires = now if owner is None else now + self.settings["provision_lease_seconds"]
        provisions = []
        while limit is None and not provisions or limit is not None:
            row = db.execute(SQL["next_waiting"]).fetchone()
            vms = row and _vms_that_fit(row["cores"], row["group_size"], limit, free)
            if not vms:
                break
            (moved,) = self._move(db, "config_handoff", {"owner": owner, "token": secrets.token_urlsafe(18),
                                                         "expires": expires, "id": row["id"], "vms": vms},
                                  to=st.PROVISIONING, refusal=st.IllegalTransition("a WAITING config changed state"))
            provision = self._provision(moved, previous=source)
            smaller = {"vms": vms} if vms < row["group_size"] else {}
            self._event(db, now, "handoff", provision["config"], owner,
                        {"from": source, **({"prewarm": True} if prewarm else {}), **smaller})
            provisions.append(provision)
            if free is not None:
                free -= vms * row["cores"]
        return provisions

    def _budget_stop(self, db, now):
        """Why nothing more is provisioned or claimed (spend reached budget_usd), or None. The
        cap is read as stored now, so that `bootstrap --set budget_usd=...` resumes a running
        server's run; each stop and each resumption is an event of kind `budget`."""
        budget = self._setting(db, "budget_usd")
        if budget is None:
            return None
        usd = self._spend_usd(db, now)
        last = db.execute(SQL["last_budget_event"]).fetchone()
        stopped = last is not None and json.loads(last[0]).get("stopped", False)
        over = usd >= budget
        if over != stopped:
            self._event(db, now, "budget", None, None, {"stopped": over, "usd": round(usd, 2), "budget_usd": budget})
        return f"the budget is spent: ${usd:,.2f} of budget_usd ${budget:,.2f}" if over else None

    def _spend_usd(self, db, now):
        """USD spent so far: every worker's seconds alive (a minute at least) at its shape's
        and model's price, and the run's own machines since its first event (prices.py)."""
        alive = db.execute(SQL["alive_by_shape"], {"minimum": prices.MINIMUM_SECONDS}).fetchall()
        started = db.execute(SQL["run_started"]).fetchone()[0]
        settings = {**self.settings, "prices": self._setting(db, "prices")}
        return prices.spend_usd(settings, [tuple(row) for row in alive], now - (started or now))

    def spend(self, *, now):
        """{usd, budget_usd}: what the run spent so far and its cap (None: no cap)."""
        with self._read() as db:
            return {"usd": round(self._spend_usd(db, now), 4), "budget_usd": self._setting(db, "budget_usd")}

    def _max_vcpus(self, db):
        """The run's max_vcpus as stored now (None: configs one after another): read each time,
        so that `bootstrap --set max_vcpus=N` holds at once for a running server."""
        return self._setting(db, "max_vcpus")

    def _provision(self, row, previous=None):
        """A provisioning answer; its group_size is what the group was given (`vms`)."""
        if row is None:
            return None
        return {"config": row["name"], "provision_token": row["provision_token"], "cores": row["cores"],
                "memory_gb": _number(row["memory_gb"]), "group_size": row["vms"], "zone": row["zone"],
                "standard": bool(row["standard"]),
                "lease_seconds_left": self.settings["provision_lease_seconds"], "previous": previous}

    @staticmethod
    def _pending_provision(db):
        """When the earliest outstanding provisioning lease lapses (None: none is outstanding)."""
        return db.execute(SQL["pending_provision"]).fetchone()[0]

    def _take_over_provisioning(self, db, owner, now):
        """A provisioning lease that lapsed before `provisioned` goes to the next one to ask.
        This holds even when workers of the new group already claim: the duty includes
        recording the group, and creating it again is harmless (create_group is idempotent).
        A config that gave its vCPUs back (its group could not run) gets them again only as
        they fit; none is taken over at the budget."""
        pending = self._pending_provision(db)
        if self.settings["provider"] == "none" or pending is None or pending > now:
            return None
        if self._budget_stop(db, now) is not None:
            return None
        limit = self._max_vcpus(db)
        free = None if limit is None else limit - db.execute(SQL["vcpus_in_use"]).fetchone()[0]
        for row in db.execute(SQL["provision_lapsed"], (now,)).fetchall():
            vms = row["vms"] or _vms_that_fit(row["cores"], row["group_size"], limit, free)
            if vms:
                taken = db.execute(SQL["provision_takeover"], {
                    "owner": owner, "token": secrets.token_urlsafe(18), "vms": vms, "id": row["id"],
                    "expires": now + self.settings["provision_lease_seconds"]}).fetchone()
                self._event(db, now, "provision_takeover", taken["name"], owner)
                return self._provision(taken)
        return None

    def acquire_provisioning(self, owner, *, now):
        """For `bootstrap`: the provisioning leases that lapsed, and with max_vcpus as many
        WAITING configs as its free vCPUs hold (without it, the first config's when the run
        has no group yet: nothing PROVISIONING or RUNNING)."""
        provisions = []
        with self._write() as db:
            while (provision := self._take_over_provisioning(db, owner, now)) is not None:
                provisions.append(provision)
            if self.settings["provider"] != "none" and (
                    self._max_vcpus(db) is not None or not provisions
                    and not db.execute(SQL["configs_active"]).fetchone()[0]):
                provisions += self._hand_off(db, owner, now, source=None)
        return _provisions(provisions)
    def provisioned(self, provision_token, *, now, worker_id=None):
        """The holder of a provisioning lease created the group. Repeating it is harmless."""
        with self._write() as db:
            row = db.execute(SQL["provision_of_token"], (provision_token,)).fetchone()
            if row is None:
                raise LeaseLost("this provisioning lease is no longer held: another worker took it over")
            if row["provisioned_at"] is None:
                db.execute(SQL["provision_made"], (now, row["id"]))
                self._event(db, now, "group_provisioned", row["name"], worker_id)
        return {}

    def group_failed(self, provision_token, error, *, now, cause=None, worker_id=None):
        """The holder of a provisioning lease could not make the group (`error`: why, in one
        line; `cause`: `capacity` when the zone is out of it) and removed it. The cause is
        recorded. Out of capacity, the group moves on (DESIGN §8): to the next of the run's
        zones, or, spot_fallback_minutes after the first try since its group was last made, to
        standard VMs from the first zone again; the holder keeps its lease and is answered
        `provision` (where to try now, retry_seconds 0). Otherwise the lease is given up until a
        retry, backed off by the config's failures since its group was last made: the first
        waits GROUP_RETRY_SECONDS[0], each further one twice as long, at most
        GROUP_RETRY_SECONDS[1]."""
        first, longest = settings_mod.GROUP_RETRY_SECONDS
        with self._write() as db:
            row = db.execute(SQL["provision_held"], (provision_token,)).fetchone()
            if row is None:
                raise LeaseLost("this provisioning lease is no longer held")
            failures = db.execute(SQL["group_failures"], (row["name"],)).fetchone()[0]
            detail = {"error": error, **({"cause": cause} if cause else {})}
            if cause == CAPACITY:
                since = db.execute(SQL["first_try"], (row["name"],)).fetchone()[0]
                move = capacity_fallback(self.settings, row["zone"], bool(row["standard"]), now - (since or now))
                if move is not None:
                    self._event(db, now, "group_failed", row["name"], worker_id, {**detail, "retry_seconds": 0})
                    zone, standard, kind, moved = move
                    self._event(db, now, kind, row["name"], worker_id, {**moved, "cause": error})
                    return {"retry_seconds": 0, "provision": self._provision(db.execute(SQL["provision_moved"], {
                        "zone": zone, "standard": standard, "id": row["id"],
                        "expires": now + self.settings["provision_lease_seconds"]}).fetchone())}
                db.execute(SQL["config_zone_reset"], (row["id"],))  # the next try starts at the first zone
            retry = min(first * 2 ** min(failures, 32), longest)
            db.execute(SQL["provision_give_up"], (secrets.token_urlsafe(18), now + retry, row["id"]))
            self._event(db, now, "group_failed", row["name"], worker_id, {**detail, "retry_seconds": retry})
        return {"retry_seconds": retry}

    def group_deleted(self, config, *, now, worker_id=None):
        """Record that a config's group was removed (once per config)."""
        with self._write() as db:
            seen = db.execute(SQL["group_deleted_seen"], (config,)).fetchone()[0]
            if not seen:
                self._event(db, now, "group_deleted", config, worker_id)
        return {}

    def extend_leases(self, *, now, seconds):
        """At server start: every lease still held gets at least one more full period, counted
        from now. A database outage is not the workers' fault; their renewals could not land."""
        with self._write() as db:
            extended = len(self._move(db, "extend_leases", {"now": now, "seconds": seconds}, to=st.STARTED))
            db.execute(SQL["provision_extend"], {"now": now, "seconds": self.settings["provision_lease_seconds"]})
            self._event(db, now, "server_started", None, None, {"leases_extended": extended})
        return extended

    # ---------------------------------------------------------------- reading

    def status(self, *, now):
        """The object `status --json` prints (DESIGN §5), plus `expired` (leases lapsed but
        not yet taken back) and the run's progress fields."""
        fields = list(st.COUNT_FIELDS.values())
        with self._read() as db:
            configs = db.execute(SQL["status_configs"]).fetchall()
            counts = db.execute(SQL["status_counts"]).fetchall()
            expired = dict(db.execute(SQL["status_expired"], (now,)).fetchall())
        per_config = {row["id"]: dict.fromkeys(["total", *fields], 0) for row in configs}
        for config_id, status, count in counts:
            per_config[config_id][st.COUNT_FIELDS[status]] = count
            per_config[config_id]["total"] += count
        totals = dict.fromkeys(["total", *fields, "expired"], 0)
        out = []
        for row in configs:
            holds = row["state"] in (st.PROVISIONING, st.RUNNING)
            entry = {"name": row["name"], "cores": row["cores"], "memory_gb": _number(row["memory_gb"]),
                     "state": row["state"], **per_config[row["id"]], "expired": expired.get(row["id"], 0),
                     "sequence": row["sequence"], "group_size": row["group_size"],
                     "vms": row["vms"] if holds else 0, "vcpus": row["cores"] * row["vms"] if holds else 0,
                     "zone": row["zone"], "standard": bool(row["standard"])}
            for key in totals:
                totals[key] += entry[key]
            out.append(entry)
        return {"configs": out, "totals": totals}

    def vcpus(self):
        """What the groups may hold (`limit`: max_vcpus, None: configs one after another) and
        hold now (`in_use`), in vCPUs."""
        with self._read() as db:
            return {"limit": self._max_vcpus(db), "in_use": db.execute(SQL["vcpus_in_use"]).fetchone()[0]}

    def config_state(self, name):
        """One config's state (WAITING, PROVISIONING, RUNNING or DONE): a poll of one row."""
        row = self.conn.execute(SQL["config_state"], (name,)).fetchone()
        if row is None:
            raise NoSuchConfig(f"no config named {name!r} in this run")
        return row["state"]

    def events(self, *, kind=None):
        rows = self.conn.execute(*((SQL["events_of_kind"], (kind,)) if kind else (SQL["events"],))).fetchall()
        return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]

    def attempts(self, key=None):
        rows = self.conn.execute(*((SQL["attempts_of_key"], (key,)) if key else (SQL["attempts"],))).fetchall()
        return [dict(row) for row in rows]

    def experiments(self):
        """Every experiment with its config's name, params and result decoded, in run order, and
        the host_* fields of its latest ended attempt (None before one ended, or in a file from
        before they were recorded, opened read-only)."""
        hosts = {} if self.version < HOST_COLUMNS_SINCE else {
            row["key"]: dict(row) for row in self.conn.execute(SQL["experiment_hosts"])}
        nothing = dict.fromkeys(HOST_COLUMNS)
        rows = sqlite_utils.Database(self.conn).query(SQL["experiments"])
        for row in rows:
            host = hosts.get(row["key"], nothing)
            yield {**row, "memory_gb": _number(row["memory_gb"]), "params": json.loads(row["params"]),
                   "result": json.loads(row["result"]) if row["result"] is not None else None,
                   **{column: host[column] for column in HOST_COLUMNS}}

    def integrity_check(self):
        """SQLite's own check of the file: ["ok"] when the database is sound."""
        return [row[0] for row in self.conn.execute(SQL["integrity_check"])]

    def query_plan(self, name):
        """EXPLAIN QUERY PLAN of a named statement, every parameter NULL (for the tests that keep
        the hot ones index seeks): its lines, a subquery's indented under its parent."""
        sql = SQL[name]
        params = dict.fromkeys(re.findall(r":(\w+)", sql)) if ":" in sql else (None,) * sql.count("?")
        rows = self.conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        return [row["detail"] for row in rows]

    # ---------------------------------------------------------------- reading: the live view and the report

    def leases(self, *, now, limit=None):
        """Leases held now, the soonest to lapse first: which worker holds which experiment,
        seconds left (negative: lapsed, not yet taken back) and how long its attempt has run."""
        rows = self.conn.execute(SQL["leases"], {"now": now, "limit": -1 if limit is None else limit}).fetchall()
        return [{**row, "seconds_left": round(row["seconds_left"], 1),
                 "running_seconds": round(row["running_seconds"], 1)} for row in map(dict, rows)]

    def provisioning(self, *, now):
        """Configs whose group is being created: by whom, and the seconds left on the
        provisioning lease (None once the group was reported made)."""
        rows = self.conn.execute(SQL["provisioning"], (now,)).fetchall()
        return [{**row, "seconds_left": None if row["seconds_left"] is None else round(row["seconds_left"], 1)}
                for row in map(dict, rows)]

    def recent_events(self, *, now, limit):
        """The newest happenings, newest first: config-level events (hand-offs, groups made and
        removed; not the `config_added` of the plan's import) and attempts that did not end DONE
        (failures, interruptions, expiries, late reports)."""
        with self._read() as db:
            events = db.execute(SQL["recent_events"], (limit,)).fetchall()
            attempts = db.execute(SQL["recent_attempts"], (limit,)).fetchall()
        merged = [{**dict(row), "detail": json.loads(row["detail"])} for row in events]
        merged += [{**{k: row[k] for k in ("at", "kind", "config", "worker", "key")},
                    "detail": {"exit_code": row["exit_code"], "error": _last_line(row["error"])}} for row in attempts]
        merged.sort(key=lambda event: event["at"], reverse=True)
        return [{"seconds_ago": round(now - event.pop("at"), 1), **event} for event in merged[:limit]]

    def timings(self, *, now, window):
        """Measured wall times: per config, how many DONE experiments have one and their mean;
        and the attempts that ended DONE in the last `window` seconds, with the seconds that
        window really covers (fewer when the run's first claim is more recent)."""
        with self._read() as db:
            per_config = db.execute(SQL["timings_per_config"]).fetchall()
            recent = db.execute(SQL["timings_recent"], (now - window,)).fetchone()[0]
            first_claim = db.execute(SQL["first_claim"]).fetchone()
        since = max(now - window, first_claim[0]) if first_claim else now
        return {"configs": {row["name"]: {"n": row["n"], "mean_wall_seconds": row["mean"]} for row in per_config},
                "recent_done": recent, "window_seconds": max(0.0, now - since)}

    def attempt_history(self):
        """Per config, in run order: its attempts counted by outcome (None: still running), with
        their seconds: the wall time the worker reported, else claim to end (an attempt cut off
        without a report)."""
        rows = self.conn.execute(SQL["attempt_history"]).fetchall()
        history = {}
        for row in rows:
            entry = history.setdefault(row["config"], {"config": row["config"], "cores": row["cores"],
                                                       "memory_gb": _number(row["memory_gb"]), "outcomes": {}})
            if row["count"]:
                entry["outcomes"][row["outcome"]] = {"count": row["count"], "seconds": row["seconds"]}
        return list(history.values())

    def idle_accounting(self, *, now):
        """Per config, in run order: how many workers were seen, their seconds alive (first to
        last call: a VM's boot before its first call is not in it), the seconds they ran a
        command (attempts' wall time; claim to end, or to now, for an attempt without one) and
        the idle fraction of the alive seconds (None before any worker lived a second)."""
        rows = self.conn.execute(SQL["idle_accounting"], {"now": now}).fetchall()
        return [{**row, "idle_fraction": idle_fraction(row["worker_seconds"], row["busy_seconds"])}
                for row in map(dict, rows)]

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _touch_worker(db, worker_id, cores, memory_gb, now):
        db.execute(SQL["worker_touch"], (worker_id, cores, memory_gb, now, now))

    @staticmethod
    def _seen(db, worker_id, now):
        """A report is a sign of life too (idle accounting counts a worker alive until its last)."""
        db.execute(SQL["worker_seen"], (now, worker_id))

    @staticmethod
    def _config_for_shape(db, cores, memory_gb):
        row = db.execute(SQL["config_of_shape"], (cores, memory_gb)).fetchone()
        if row is None:
            shapes = ", ".join(name for (name,) in db.execute(SQL["config_names"]))
            raise NoSuchConfig(f"no config of this run has the shape {cores} cores x {_number(memory_gb)} GB"
                               f" (configs: {shapes or 'none'})")
        return row

    @staticmethod
    def _event(db, now, kind, config, worker=None, detail=None):
        db.execute(SQL["event_add"], (now, kind, config, worker, json.dumps(detail or {})))


def _provisions(provisions):
    """An answer's provisioning leases: `provisions`, all of them, and `provision`, the first
    (or None), as answers had it before configs ran concurrently."""
    return {"provision": provisions[0] if provisions else None, "provisions": provisions}


def capacity_fallback(settings, zone, standard, seconds_without):
    """Where a group whose zone is out of capacity tries next, `seconds_without` after the first
    try at it: (zone, standard, event kind, event detail), or None (wait and try again). The
    next of the run's zones; past the last, standard VMs from the first zone once
    spot_fallback_minutes have passed."""
    zones = run_zones(settings)
    here = zone or (zones[0] if zones else None)
    later = zones[zones.index(here) + 1:] if here in zones else []
    if later:
        return later[0], standard, "zone_fallback", {"from": here, "to": later[0]}
    minutes = settings.get("spot_fallback_minutes")
    if minutes is not None and settings.get("spot", True) and not standard and seconds_without >= minutes * 60:
        first = zones[0] if zones else None
        return first, True, "spot_fallback", {"seconds": round(seconds_without, 1), "zone": first}
    return None


def _vms_that_fit(cores, group_size, limit, free):
    """The VMs a config's group is given: all of group_size without a limit; else as many as
    the `free` vCPUs of `limit` hold, and one when nothing is held at all (a run never stalls;
    a shape bigger than the limit is refused when the run is made). 0: it must wait."""
    if limit is None:
        return group_size
    fits = min(group_size, free // cores)
    return 1 if fits < 1 and free >= limit else max(fits, 0)


def idle_fraction(worker_seconds, busy_seconds):
    """The share of workers' alive seconds not spent running a command (None: nobody lived)."""
    if worker_seconds <= 0:
        return None
    return round(max(0.0, 1.0 - busy_seconds / worker_seconds), 4)


def _host_row(host):
    """The host_* columns from a report's `host` object: its known fields, each a string or a
    number (fields a newer worker sends and this version does not know are left out)."""
    host = host or {}
    for name, value in host.items():
        if name in HOST_FIELDS and not (value is None or isinstance(value, (str, int, float))
                                        and not isinstance(value, bool)):
            raise BadInput(f"host field {name!r} must be a string or a number")
    return {f"host_{name}": host.get(name) for name in HOST_FIELDS}


def _last_line(text):
    """The last non-empty line of an error tail, kept short for a one-line feed."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


@functools.cache
def schema_definition(table):
    """The CREATE TABLE statement SQLite keeps for `table` of schema.sql, and its columns."""
    conn = sqlite3.connect(":memory:")
    try:
        for statement in _statements(schema_sql()):
            conn.execute(statement)
        columns = tuple(row[0] for row in conn.execute(SQL["table_columns"], (table,)))
        return conn.execute(SQL["table_definition"], (table,)).fetchone()[0], columns
    finally:
        conn.close()


def _add_new_columns(db, table):
    """The columns schema.sql gives `table` and an older database's lacks, added as schema.sql
    writes them (one column a line there)."""
    definition, columns = schema_definition(table)
    present = {row[0] for row in db.execute(SQL["table_columns"], (table,))}
    for line in definition.splitlines():
        words = line.split(None, 1)
        if words and words[0] in columns and words[0] not in present:
            db.execute(f'ALTER TABLE "{table}" ADD COLUMN {line.strip().rstrip(",")}')


def _set_aside_if_changed(db, table):
    """An older database's `table` whose definition is not schema.sql's: renamed out of the
    way, its indexes and triggers dropped (schema.sql makes them anew on the new table), and
    the name it now has returned; None when there is nothing to rebuild."""
    stored = db.execute(SQL["table_definition"], (table,)).fetchone()
    if stored is None or stored[0] == schema_definition(table)[0]:
        return None
    for kind, name in db.execute(SQL["objects_on_table"], (table,)).fetchall():
        db.execute(f'DROP {kind.upper()} "{name}"')
    old = f"{table}_before_v{SCHEMA_VERSION}"
    db.execute(f'ALTER TABLE "{table}" RENAME TO "{old}"')
    return old


def _move_rows(db, old, table):
    """Every row of the set-aside `old` into the new `table` (the columns both have), then
    `old` dropped."""
    new_columns = {row[0] for row in db.execute(SQL["table_columns"], (table,))}
    columns = ", ".join(f'"{row[0]}"' for row in db.execute(SQL["table_columns"], (old,)) if row[0] in new_columns)
    db.execute(f'INSERT INTO "{table}" ({columns}) SELECT {columns} FROM "{old}"')
    db.execute(f'DROP TABLE "{old}"')


def _statements(script):
    """Split schema.sql into statements (sqlite3.complete_statement keeps triggers whole)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            if statement.strip():
                yield statement
            statement = ""

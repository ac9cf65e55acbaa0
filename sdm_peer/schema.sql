-- sdm-peer database schema: the single source of truth for tables, states and indexes.
-- Loaded by store.py (and only there). Every statement is idempotent so opening an
-- existing database re-applies it harmlessly. Connection pragmas (WAL, foreign keys,
-- busy timeout, synchronous) are set by store.connect() on every connection, since
-- SQLite keeps only journal_mode in the file.

-- Run settings (DESIGN §5): one row per key, the value as JSON text.
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL CHECK (json_valid(value))
) WITHOUT ROWID;

-- One row per hardware shape. A shape names exactly one config.
CREATE TABLE IF NOT EXISTS configs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    cores       INTEGER NOT NULL CHECK (cores > 0),
    memory_gb   REAL NOT NULL CHECK (memory_gb > 0),
    sequence    INTEGER NOT NULL UNIQUE,
    group_size  INTEGER NOT NULL CHECK (group_size > 0),
    state       TEXT NOT NULL DEFAULT 'WAITING'
                CHECK (state IN ('WAITING', 'PROVISIONING', 'RUNNING', 'DONE')),
    -- The provisioning lease: who must create this config's group, until when. An expiry is
    -- set exactly while the lease is outstanding; the token stays after `provisioned` (expiry
    -- cleared) so that a repeated report is recognised.
    provision_owner      TEXT,
    provision_token      TEXT UNIQUE,
    provision_expires_at REAL,
    provisioned_at       REAL,
    done_at              REAL,
    -- The VMs its group was given (group_size, made smaller to fit max_vcpus): cores x vms is
    -- what it holds of max_vcpus while PROVISIONING or RUNNING; 0 while it holds none.
    vms                  INTEGER NOT NULL DEFAULT 0 CHECK (vms >= 0),
    -- Where its group goes (gce: a zone of the run's; NULL: the run's `zone`), moved on when the
    -- zone is out of capacity, and whether it was made standard after spot_fallback_minutes
    -- without spot capacity (DESIGN §8).
    zone                 TEXT,
    standard             INTEGER NOT NULL DEFAULT 0 CHECK (standard IN (0, 1)),
    UNIQUE (cores, memory_gb),
    CHECK (provision_expires_at IS NULL OR provision_token IS NOT NULL)
);

-- Outstanding provisioning leases: "is a hand-off pending, and when does it lapse" on every claim.
CREATE INDEX IF NOT EXISTS configs_provisioning
    ON configs (provision_expires_at)
    WHERE provision_expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS experiments (
    id               INTEGER PRIMARY KEY,
    key              TEXT NOT NULL UNIQUE,
    config           INTEGER NOT NULL REFERENCES configs (id),
    params           TEXT NOT NULL DEFAULT '{}'
                     CHECK (json_valid(params) AND json_type(params) = 'object'),
    status           TEXT NOT NULL DEFAULT 'NOT STARTED'
                     CHECK (status IN ('NOT STARTED', 'STARTED', 'DONE', 'ERROR',
                                       'INTERRUPTED', 'LEGACY', 'FAILED')),
    lease_owner      TEXT,
    lease_token      TEXT UNIQUE,
    lease_expires_at REAL,
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    failures         INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    interruptions    INTEGER NOT NULL DEFAULT 0 CHECK (interruptions >= 0),
    result           TEXT CHECK (result IS NULL OR (json_valid(result) AND json_type(result) = 'object')),
    wall_seconds     REAL,
    failed_reason    TEXT,
    updated_at       REAL,
    -- A lease exists exactly while the experiment is STARTED.
    CHECK ((status = 'STARTED') = (lease_token IS NOT NULL)),
    CHECK ((lease_token IS NULL) = (lease_expires_at IS NULL)),
    CHECK ((lease_token IS NULL) = (lease_owner IS NULL))
);

-- The claim query: the first claimable experiment of one config, found by a single
-- index seek whatever the table size. The WHERE clause must match store.py's word for word.
CREATE INDEX IF NOT EXISTS experiments_claimable
    ON experiments (config, id)
    WHERE status IN ('NOT STARTED', 'INTERRUPTED', 'ERROR');

-- Leases of one config in expiry order: lazy reclamation and "when does the next one lapse".
CREATE INDEX IF NOT EXISTS experiments_leased
    ON experiments (config, lease_expires_at)
    WHERE status = 'STARTED';

-- Leases by holder: "does this worker already hold a lease" on every claim, and a worker's
-- release, as one seek however many leases are live (without it, both walk every live lease).
CREATE INDEX IF NOT EXISTS experiments_lease_owner
    ON experiments (lease_owner, config)
    WHERE status = 'STARTED';

-- Per-config counts for status and "is this config finished".
CREATE INDEX IF NOT EXISTS experiments_config_status
    ON experiments (config, status);

CREATE TABLE IF NOT EXISTS attempts (
    id           INTEGER PRIMARY KEY,
    experiment   INTEGER NOT NULL REFERENCES experiments (id),
    number       INTEGER NOT NULL CHECK (number > 0),
    worker       TEXT NOT NULL,
    lease_token  TEXT NOT NULL UNIQUE,
    claimed_at   REAL NOT NULL,
    ended_at     REAL,
    -- EXPIRED: the lease lapsed and was taken back; LOST: a report came after that.
    outcome      TEXT CHECK (outcome IS NULL
                             OR outcome IN ('DONE', 'ERROR', 'INTERRUPTED', 'EXPIRED', 'LOST')),
    wall_seconds REAL,
    exit_code    INTEGER,
    error        TEXT,
    result       TEXT CHECK (result IS NULL OR json_valid(result)),
    -- Where it ran (DESIGN §9), as the worker reported with its outcome: the CPU model, the CPUs
    -- it had ("0-1"), how it was confined (cgroup, affinity, none), the hypervisor's steal time
    -- on those CPUs, the command's peak memory; on a cloud VM its CPU platform and boot-to-first-claim.
    host_cpu_model              TEXT,
    host_cpus                   TEXT,
    host_confinement            TEXT,
    host_steal_seconds          REAL,
    host_max_rss_mb             REAL,
    host_cpu_platform           TEXT,
    host_boot_to_claim_seconds  REAL,
    UNIQUE (experiment, number)
);

-- Attempts by outcome in the order they ended: the live view's throughput (DONE in the last
-- minutes) and its feed of failures, expiries and interruptions, without a scan of the table.
CREATE INDEX IF NOT EXISTS attempts_outcome_ended
    ON attempts (outcome, ended_at);

CREATE TABLE IF NOT EXISTS workers (
    id         TEXT PRIMARY KEY,
    cores      INTEGER NOT NULL,
    memory_gb  REAL NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL
) WITHOUT ROWID;

-- Workers of a config's shape, for the shrink rule's count of idle workers.
CREATE INDEX IF NOT EXISTS workers_shape ON workers (cores, memory_gb);

-- Workers told to leave their group while its config still ran (the `shrink` setting): they
-- no longer count towards the config's reserve of idle workers.
CREATE TABLE IF NOT EXISTS departures (
    worker  TEXT PRIMARY KEY REFERENCES workers (id),
    config  INTEGER NOT NULL REFERENCES configs (id),
    left_at REAL NOT NULL
) WITHOUT ROWID;

-- Append-only log of config-level happenings. No table refers to it, so that a database made
-- by an older version, whose kind list is shorter, gets it rebuilt (store.py) when it opens:
-- SQLite cannot alter a CHECK constraint.
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY,
    at     REAL NOT NULL,
    kind   TEXT NOT NULL CHECK (kind IN ('config_added', 'config_reopened', 'config_running',
                                         'config_done', 'handoff', 'provision_takeover',
                                         'group_provisioned', 'group_failed', 'group_deleted',
                                         'server_started', 'budget', 'zone_fallback',
                                         'spot_fallback')),
    config TEXT,
    worker TEXT,
    detail TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
);

CREATE TRIGGER IF NOT EXISTS events_append_only_update
    BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete
    BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

-- One config's events of a kind: "was its group removed", "why can its group not run".
CREATE INDEX IF NOT EXISTS events_of_config
    ON events (config, kind);

-- "Did this config hand off already" (pre-warming hands off at the last claim, not at DONE).
CREATE INDEX IF NOT EXISTS events_handoff_from
    ON events (json_extract(detail, '$.from'))
    WHERE kind = 'handoff';

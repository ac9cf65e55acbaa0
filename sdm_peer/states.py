"""Experiment statuses, config states and attempt outcomes: the words of DESIGN §3, and the one
table of which event may move an experiment from which statuses to which."""

# Experiment statuses (the original system's words, plus FAILED).
NOT_STARTED = "NOT STARTED"
STARTED = "STARTED"
DONE = "DONE"
ERROR = "ERROR"
INTERRUPTED = "INTERRUPTED"
LEGACY = "LEGACY"
FAILED = "FAILED"
STATUSES = (NOT_STARTED, STARTED, DONE, ERROR, INTERRUPTED, LEGACY, FAILED)

CLAIMABLE = (NOT_STARTED, INTERRUPTED, ERROR)
FINISHED = (DONE, FAILED, LEGACY)
UNFINISHED = tuple(status for status in STATUSES if status not in FINISHED)

# Config states, in the order a config goes through them.
WAITING = "WAITING"
PROVISIONING = "PROVISIONING"
RUNNING = "RUNNING"
CONFIG_DONE = "DONE"
CONFIG_STATES = (WAITING, PROVISIONING, RUNNING, CONFIG_DONE)

# Attempt outcomes. EXPIRED: the lease lapsed and was taken back. LOST: a report came after that.
OUTCOMES = (DONE, ERROR, INTERRUPTED, "EXPIRED", "LOST")
EXPIRED = "EXPIRED"
LOST = "LOST"
# Outcomes of attempts whose work is done again: their compute time is lost to re-runs.
UNSUCCESSFUL = (ERROR, INTERRUPTED, EXPIRED, LOST)

# event -> (statuses it may leave, statuses it may lead to). store.py checks every UPDATE
# against this table; an UPDATE that matches no row is a refusal, never a silent no-op.
TRANSITIONS = {
    "claim": (CLAIMABLE, (STARTED,)),
    "expire": ((STARTED,), (NOT_STARTED, FAILED)),
    "renew": ((STARTED,), (STARTED,)),
    "complete": ((STARTED,), (DONE,)),
    "fail": ((STARTED,), (ERROR, FAILED)),
    "release": ((STARTED,), (INTERRUPTED, FAILED)),
}

# Keys of the per-status counts in `status --json`.
COUNT_FIELDS = {status: status.lower().replace(" ", "_") for status in STATUSES}

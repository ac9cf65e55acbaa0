"""Experiment statuses, config states and attempt outcomes (the words of DESIGN §3), and the two
transition tables that say which event may move an experiment or a config from which to which.

The tables are the enforcement, as in h11's `_state.py`: store.py builds the guard of every
UPDATE that moves a row (`status IN (...)`, `state IN (...)`) from the event's sources here, and
`leaving()` refuses a target the event may not lead to."""

from .errors import SdmPeerError

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
EXPIRED = "EXPIRED"
LOST = "LOST"
OUTCOMES = (DONE, ERROR, INTERRUPTED, EXPIRED, LOST)
# Outcomes of attempts whose work is done again: their compute time is lost to re-runs.
UNSUCCESSFUL = (ERROR, INTERRUPTED, EXPIRED, LOST)

# Kinds of the events log (config-level happenings). group_failed: the cloud said why a group
# cannot make its VMs (a quota, a stockout); the config's provisioning is retried later, backed
# off. budget: spend reached budget_usd (nothing more is provisioned or claimed) or the cap was
# raised again. zone_fallback, spot_fallback: a group moved to the next zone, or to standard VMs.
EVENT_KINDS = ("config_added", "config_reopened", "config_running", "config_done", "handoff", "provision_takeover",
               "group_provisioned", "group_failed", "group_deleted", "server_started", "budget", "zone_fallback",
               "spot_fallback")

# event -> (statuses it may leave, statuses it may lead to). A plan adds experiments as NOT STARTED.
EXPERIMENT_TRANSITIONS = {
    # A worker of the config's shape takes the first claimable experiment under a new lease.
    "claim": (CLAIMABLE, (STARTED,)),
    # The holder keeps it: a renewal, the same lease again for a claim whose answer was lost,
    # or every lease pushed out at server start (an outage is not the workers' fault).
    "renew": ((STARTED,), (STARTED,)),
    # The command exited 0: the result is stored and the lease ends.
    "complete": ((STARTED,), (DONE,)),
    # The command failed: claimable again, or FAILED once `max_failures` is reached.
    "fail": ((STARTED,), (ERROR, FAILED)),
    # The worker gave the lease back (SIGTERM, shutdown): or FAILED at `max_interruptions`.
    "release": ((STARTED,), (INTERRUPTED, FAILED)),
    # The lease lapsed and a claim took it back: or FAILED at `max_interruptions`.
    "expire": ((STARTED,), (NOT_STARTED, FAILED)),
}

# event -> (states it may leave, states it may lead to). A plan adds configs as WAITING.
CONFIG_TRANSITIONS = {
    # A finishing config (or bootstrap) hands the next one's group to a provisioning lease.
    "handoff": ((WAITING,), (PROVISIONING,)),
    # The first claim by a worker of the shape: a worker is proof that its group exists,
    # whether or not a hand-off asked for it (workers started by hand).
    "first_claim": ((WAITING, PROVISIONING), (RUNNING,)),
    # Its last unfinished experiment finished. From every unfinished state, so that a config
    # with nothing left to run never stays open.
    "finish": ((WAITING, PROVISIONING, RUNNING), (CONFIG_DONE,)),
    # A plan imported again added experiments to a finished config: it waits for a group again.
    "reopen": ((CONFIG_DONE,), (WAITING,)),
}


class IllegalTransition(SdmPeerError):
    """A move its transition table does not allow, or a guarded UPDATE that found its row in a
    state the event may not leave, inside a transaction that read it: a bug, never a refusal
    that a worker should see as anything but INTERNAL."""


def leaving(table, event, *targets):
    """The statuses `event` may leave in `table`, once each of `targets` is one it may lead to.
    Raises IllegalTransition for an event not in the table or a target not allowed."""
    try:
        sources, allowed = table[event]
    except KeyError:
        raise IllegalTransition(f"no event {event!r} in this transition table") from None
    for target in targets:
        if target not in allowed:
            raise IllegalTransition(f"{event} may not lead to {target!r}, only to {', '.join(allowed)}")
    return sources


# Keys of the per-status counts in `status --json`.
COUNT_FIELDS = {status: status.lower().replace(" ", "_") for status in STATUSES}

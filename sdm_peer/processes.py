"""Processes this machine runs for a run (servers, group supervisors, workers), by pid."""

import os
import time


def alive(pid):
    """True if the process exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state, parent pid, ...); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def ours(pid):
    """True if pid is an sdm-peer process: a recorded pid may have been reused since."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read()
    except OSError:
        return False
    return b"sdm_peer" in command or b"sdm-peer" in command


def replicator_of(pid):
    """The Litestream process that runs `pid` as its `-exec` child (a server under `serve
    --replicate`), or None."""
    fields = _stat_fields(pid)
    if len(fields) < 2:
        return None
    parent = int(fields[1])
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as cmdline:
            command = cmdline.read().split(b"\0")
    except OSError:
        return None
    is_litestream = command[0].endswith(b"litestream") and b"-exec" in command
    return parent if is_litestream and ours(parent) else None


def signal_ours(pid, signum):
    """Send `signum` to pid if it is still an sdm-peer process."""
    if pid and ours(pid):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_gone(pids, timeout, poll=0.05):
    """Wait up to `timeout` seconds for every process in `pids` to end; True if they did."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True

"""The local provider: a group is `group_size` worker processes on this machine (DESIGN §6).

Like a managed instance group, a small per-group supervisor keeps the group at size: a worker
that dies (killed, crashed) is replaced; one that exits 0 (its config is finished) is not. The
group's state lives under RUNDIR/groups/CONFIG/: group.json (the record), workers.json (the
live worker pids) and the logs. Run as `python -m sdm_peer.providers.local GROUPDIR` it is the
supervisor.

Workers find the server through the run directory (server.json), or, when the run's `server`
setting is given (HOST:PORT, e.g. a proxy in front of the server), through that address with
the run's token file."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ProviderError, SettingsError
from ..processes import alive, signal_ours, wait_gone
from ..rundir import RunDir
from .base import Provider

log = logging.getLogger("sdm_peer.local")

STOP_WAIT = 30.0  # seconds delete_group waits for a group's processes to end
RESPAWN_BACKOFF = (1.0, 30.0)  # first and longest wait before replacing a worker that died
STEADY_SECONDS = 60.0  # a worker that lived this long resets its slot's backoff


class LocalProvider(Provider):
    def __init__(self, run_dir, server=None):
        """`server`: the HOST:PORT workers use to reach the server (None: RUNDIR/server.json)."""
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.server = server

    @classmethod
    def for_run(cls, settings, run_dir, token):
        if run_dir is None:
            raise SettingsError("the local provider needs the run directory (SDM_RUN_DIR or --dir)")
        return cls(run_dir, server=settings.get("server"))

    @classmethod
    def default_max_vcpus(cls, settings, shapes):
        """This machine's cores (the CPUs it lets this process use); at least the biggest shape,
        which `confine=none` lets run on a smaller machine."""
        return max([len(os.sched_getaffinity(0)), *(cores for cores, _ in shapes)])

    @classmethod
    def check_run(cls, settings, shapes):
        """A shape bigger than this machine is refused, unless the run goes unconfined; so is
        `confine=cgroup` where no cgroup tree is writable."""
        from ..confine import Layout, refuse_bigger_than_machine

        confine = settings.get("confine", "auto")
        refuse_bigger_than_machine(shapes, confine)
        if confine == "cgroup":
            layout, why = Layout.detect()
            if layout is None:
                raise SettingsError(f"confine=cgroup, but no writable cgroup tree here: {why}",
                                    hint="--set confine=auto uses CPU affinity where cgroups cannot be made")

    def group_dir(self, name):
        return self.run.groups / name

    def group(self, name):
        return _read_json(self.group_dir(name) / "group.json")

    def groups(self):
        if not self.run.groups.is_dir():
            return []
        return [record for path in sorted(self.run.groups.iterdir()) if (record := self.group(path.name))]

    def create_group(self, spec):
        """Start the group's supervisor unless it is already running (idempotent)."""
        name = spec.name
        directory = self.group_dir(name)
        record = self.group(name)
        if record and not record["deleted"] and alive(record["supervisor_pid"]):
            return record
        directory.mkdir(parents=True, exist_ok=True)
        record = {"config": name, "cores": spec.cores, "memory_gb": spec.memory_gb, "size": spec.group_size,
                  "created_at": time.time(), "deleted": False,
                  "supervisor_pid": None, "server": self.server}
        _write_json(directory / "group.json", record)
        with open(directory / "supervisor.log", "ab") as logfile:
            try:
                supervisor = subprocess.Popen([sys.executable, "-m", "sdm_peer.providers.local", str(directory)],
                                              stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                              start_new_session=True)
            except OSError as exc:
                raise ProviderError(f"cannot start the supervisor of group {name}: {exc}") from None
        record["supervisor_pid"] = supervisor.pid
        _write_json(directory / "group.json", record)
        return record

    def delete_group(self, spec):
        """Stop the group: no more replacements, every worker gets SIGTERM (idempotent).

        Called from inside the group (a worker removing its own), it does not wait: the
        supervisor ends the caller too, as deleting its own VM's group would."""
        name = spec.name
        record = self.group(name)
        if record is None:
            return
        if not record["deleted"]:
            record["deleted"] = True
            _write_json(self.group_dir(name) / "group.json", record)
        pids = [record["supervisor_pid"], *self.worker_pids(name)]
        signal_ours(record["supervisor_pid"], signal.SIGTERM)
        if os.environ.get("SDM_GROUP") == name and os.environ.get("SDM_RUN_DIR") == str(self.run.path):
            return
        wait_gone(pids, STOP_WAIT, poll=0.1)
        for pid in pids:
            signal_ours(pid, signal.SIGKILL)

    def leave_group(self, spec, worker_id):
        """Shrinking: the worker's own exit (status 0) is its leaving. The supervisor never
        replaces a worker that exited 0, which lowers the group's target by one; the group ends
        when its last worker has exited 0 or when it is deleted."""

    def worker_pids(self, name):
        return list((_read_json(self.group_dir(name) / "workers.json") or {}).values())


class Supervisor:
    """Keeps one group at size until told to stop (SIGTERM) or until every worker is finished."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.run_dir = RunDir(self.directory.parent.parent)
        self.record = _read_json(self.directory / "group.json")
        self.stopping = False
        self.slots = {}  # slot -> (Popen, started_at)
        self.finished = set()
        self.backoff = {}
        self.generation = {}  # slot -> how many workers it has started, for worker ids

    def worker_command(self, slot):
        server = self.record.get("server")
        reach = (["--server", server, "--token-file", str(self.run_dir.token_file)] if server
                 else ["--dir", str(self.run_dir.path)])
        return [sys.executable, "-m", "sdm_peer", "work", *reach,
                "--cores", str(self.record["cores"]), "--memory-gb", str(self.record["memory_gb"]),
                "--worker-id", f"{self.record['config']}-s{slot}-{os.getpid()}.{self.generation[slot]}"]

    def spawn(self, slot):
        self.generation[slot] = self.generation.get(slot, 0) + 1
        env = {**os.environ, "SDM_RUN_DIR": str(self.run_dir.path), "SDM_GROUP": self.record["config"]}
        with open(self.directory / f"worker-{slot}.log", "ab") as logfile:
            process = subprocess.Popen(self.worker_command(slot), stdin=subprocess.DEVNULL, stdout=logfile,
                                       stderr=logfile, env=env, start_new_session=True)
        self.slots[slot] = (process, time.monotonic())
        log.info("slot %s: started worker pid %s", slot, process.pid)
        self._save_pids()

    def _save_pids(self):
        _write_json(self.directory / "workers.json",
                    {str(slot): process.pid for slot, (process, _) in self.slots.items() if process.poll() is None})

    def run(self):
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for slot in range(self.record["size"]):
            self.spawn(slot)
        due = {}
        while not self.stopping and len(self.finished) < self.record["size"]:
            for slot, (process, started) in list(self.slots.items()):
                if slot in self.finished or process.poll() is None:
                    continue
                if process.returncode == 0:
                    log.info("slot %s: worker finished", slot)
                    self.finished.add(slot)
                    self._save_pids()
                    continue
                if slot not in due:
                    wait = self._next_backoff(slot, time.monotonic() - started)
                    log.info("slot %s: worker died (status %s); replacing it in %.0fs", slot, process.returncode, wait)
                    due[slot] = time.monotonic() + wait
                elif time.monotonic() >= due[slot]:
                    del due[slot]
                    self.spawn(slot)
            time.sleep(0.1)
        self._stop_workers()

    def _next_backoff(self, slot, lived):
        first, longest = RESPAWN_BACKOFF
        wait = first if lived >= STEADY_SECONDS else min(self.backoff.get(slot, first / 2) * 2, longest)
        self.backoff[slot] = wait
        return wait

    def _stop(self, *_):
        self.stopping = True

    def _stop_workers(self):
        live = [process for process, _ in self.slots.values() if process.poll() is None]
        for process in live:
            signal_ours(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        for process in live:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_ours(process.pid, signal.SIGKILL)
                process.wait()
        self._save_pids()


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def _write_json(path, data):
    temporary = Path(str(path) + ".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(message)s")
    Supervisor(sys.argv[1]).run()

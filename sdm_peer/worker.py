"""`sdm-peer work`: the worker agent (DESIGN §5).

Claims experiments for its own shape, runs COMMAND once per claim in a fresh working directory,
renews the lease at a third of its period while the command runs, and reports. It never gives up
on an unreachable server while it holds a result; it gives a lease back on SIGTERM; a provisioning
lease in an answer makes it create the next group (renewing that lease meanwhile), and a finished
config makes it remove its own.
With the `shrink` setting, a worker the server tells to leave (nothing to claim, enough idle
peers) leaves its group and exits 0.
"""

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

from . import confine
from . import settings as settings_mod
from . import states as st
from .errors import BadInput, LeaseLost, ProviderError, SdmPeerError, ServerUnavailable
from .failpoints import failpoint
from .protocol import MAX_CAUSE_TEXT
from .providers.base import GroupSpec

log = logging.getLogger("sdm_peer.worker")

MAX_RESULT_BYTES = 256 * 1024
ERROR_TAIL_BYTES = 4000
TERM_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of a command
SHUTDOWN_DEADLINE = 18.0  # seconds from SIGTERM to exit (the contract says within 20)
IDLE_BACKOFF = (0.5, 30.0)  # first and longest wait when there is nothing to claim
POLL = 0.1


def machine_shape():
    """This machine's (cores, memory_gb): memory rounded to a whole GB."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        raise SdmPeerError("cannot read this machine's memory size",
                           hint="pass --cores and --memory-gb") from None
    return cores, max(1, round(kib / 1024 / 1024))


def default_worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(self, client, command, *, worker_id, cores, memory_gb, work_root, provider_for=None,
                 own_group=None, vm_facts=None):
        """`provider_for(settings)` returns the provider that creates and deletes groups (or None);
        `own_group` names the group this worker belongs to, if a provider started it; `vm_facts`
        (on a cloud VM) what each attempt records of the VM, e.g. its `cpu_platform`."""
        self.client, self.command = client, command
        self.worker_id, self.cores, self.memory_gb = worker_id, cores, memory_gb
        self.work_root = Path(work_root).absolute()
        self.provider_for, self.own_group = provider_for, own_group
        self.vm_facts = vm_facts
        self.confiner = None
        self.stopping = threading.Event()
        self.stopped_at = None
        self.settings = {}
        self.lease_seconds = settings_mod.DEFAULT_LEASE_SECONDS

    def stop(self, *_):
        """SIGTERM: stop claiming, end the command, give the lease back, exit."""
        if not self.stopping.is_set():
            self.stopped_at = time.monotonic()
            self.stopping.set()

    def run(self):
        """Work until the config is finished or the worker left its group (0), or until it is
        told to stop (143)."""
        signal.signal(signal.SIGTERM, self.stop)
        shape = {"worker_id": self.worker_id, "cores": self.cores, "memory_gb": self.memory_gb}
        hello = self._call("hello", **shape)
        if hello is None:
            return 143
        self.settings, self.lease_seconds = hello["settings"], hello["lease_seconds"]
        self.command = self.command or self.settings.get("command")
        if not self.command:
            raise BadInput("no command to run", hint="give one after `--`, or set `command` in the run settings")
        log.info("worker %s (%s cores, %s GB) for config %s", self.worker_id, self.cores, self.memory_gb,
                 hello["config"])
        self.confiner = confine.Confiner.for_settings(self.settings, self.cores, self.memory_gb, self.work_root)
        idle = IDLE_BACKOFF[0]
        while not self.stopping.is_set():
            answer = self._call("claim", **shape)
            if answer is None:
                break
            if provisions_of(answer):
                self.provision_holding(provisions_of(answer), answer["experiment"])
            if answer["experiment"]:
                if self.vm_facts is not None and "boot_to_claim_seconds" not in self.vm_facts:
                    self.vm_facts["boot_to_claim_seconds"] = confine.uptime_seconds()
                self.run_experiment(answer["experiment"])
                idle = IDLE_BACKOFF[0]
                continue
            if answer.get("stop"):
                self.stop_for_budget(answer)
                return 0
            if answer.get("leave") and self.leave_group(answer["config"]):
                return 0
            if answer["config_done"] and not answer["handoff_pending"]:
                self.remove_own_group(answer["config"])
                log.info("config %s is done; exiting", answer["config"])
                return 0
            wait = idle if answer["retry_after"] is None else min(idle, answer["retry_after"] + POLL)
            self.stopping.wait(wait)
            idle = min(idle * 2, IDLE_BACKOFF[1])
        return 143

    def _call(self, op, **args):
        """A call that waits out a server outage, unless the worker is told to stop."""
        while True:
            try:
                return self.client.call(op, retry_seconds=2.0, **args)
            except ServerUnavailable as exc:
                if self.stopping.is_set() and self._past_deadline():
                    log.warning("giving up on %s: %s", op, exc)
                    return None
                log.info("%s: %s; still trying", op, exc)

    def _past_deadline(self, margin=0.0):
        return self.stopped_at is not None and time.monotonic() - self.stopped_at > SHUTDOWN_DEADLINE - margin

    # ---------------------------------------------------------------- one experiment

    def run_experiment(self, experiment):
        token = experiment["lease_token"]
        workdir = self._fresh_workdir(experiment)
        params_file, result_file = workdir / "params.json", workdir / "result.json"
        params_file.write_text(json.dumps(experiment["params"]))
        env = {**os.environ, "SDM_EXPERIMENT_KEY": experiment["key"], "SDM_PARAMS": json.dumps(experiment["params"]),
               "SDM_PARAMS_FILE": str(params_file), "SDM_RESULT_FILE": str(result_file),
               "SDM_ATTEMPT": str(experiment["attempt"]), "SDM_WORKDIR": str(workdir),
               **confine.shape_environment(self.cores, self.memory_gb, os.environ)}
        log.info("running %s (attempt %s) in %s", experiment["key"], experiment["attempt"], workdir)
        # The lease is kept from here: waiting for free CPUs counts as holding the experiment.
        with LeaseKeeper(self.client, self.lease_seconds, lease_token=token) as keeper:
            with self.confiner.placed(lambda: self.stopping.is_set() or keeper.lost.is_set()) as placement:
                ended = None if placement is None else self._run_command(workdir, env, placement, keeper)
        if keeper.lost.is_set():
            log.warning("lease on %s lost: the command was stopped", experiment["key"])
        elif ended is None:
            self._release(token)
        elif ended.status == 0:
            self._report_success(token, result_file, ended.wall, ended.host)
        else:
            self._report_failure(token, ended.error, ended.status, ended.wall, ended.host)

    def _run_command(self, workdir, env, placement, keeper):
        """Run the command where `placement` says; how it ended, or None when it was stopped
        (SIGTERM, or the lease was lost)."""
        started = time.monotonic()
        with open(workdir / "stdout.log", "wb") as out, open(workdir / "stderr.log", "wb") as err:
            try:
                # Between fork and exec the child enters its cgroup or sets its affinity: system
                # calls only, and this thread is the only one that forks.
                process = subprocess.Popen(self.command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=err, start_new_session=True,
                                           preexec_fn=placement.preexec)
            except (OSError, subprocess.SubprocessError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else exc
                return Ended(None, 0.0, self._host(placement), f"cannot start {self.command[0]!r}: {why}")
            usage = None
            while usage is None and not (self.stopping.is_set() or keeper.lost.is_set()):
                usage = _wait_with_usage(process, POLL)
            if usage is None:
                _terminate(process)
                return None
        wall = time.monotonic() - started
        error = None
        if process.returncode != 0:
            # Killed at its memory limit, the command is told so, not left with a bare exit 137.
            error = "\n".join(filter(None, (placement.oom_error(), _tail(workdir / "stderr.log"))))
            error = error or f"exited with status {process.returncode}"
        return Ended(process.returncode, wall, self._host(placement, usage), error)

    def _host(self, placement, usage=None):
        return {**placement.facts(usage), **(self.vm_facts or {})}

    def _fresh_workdir(self, experiment):
        """RUNDIR/work/KEY/attempt-N, never one that exists: after a database restore an
        attempt number can come again, and an earlier attempt's logs must not be overwritten."""
        workdir = self.work_root / _safe(experiment["key"]) / f"attempt-{experiment['attempt']}"
        workdir.parent.mkdir(parents=True, exist_ok=True)
        try:
            workdir.mkdir()
        except FileExistsError:
            workdir = workdir.with_name(f"{workdir.name}-{experiment['lease_token'][:8]}")
            workdir.mkdir()
        return workdir

    def _report_success(self, token, result_file, wall, host):
        try:
            result = read_result(result_file)
        except SdmPeerError as exc:
            self._report_failure(token, str(exc), 0, wall, host)
            return
        self._report("complete", lease_token=token, result=result, wall_seconds=wall, host=host)

    def _report_failure(self, token, error, exit_code, wall, host):
        self._report("fail", lease_token=token, error=error, exit_code=exit_code, wall_seconds=wall, host=host)

    def _report(self, op, **args):
        """Report an outcome; keep trying while the server is away: the result must not be lost."""
        try:
            answer = self._call(op, **args)
        except LeaseLost as exc:
            log.warning("report refused: %s", exc)
            return
        if answer and provisions_of(answer):
            self.provision_all(provisions_of(answer))

    def _release(self, token):
        try:
            self.client.call("release", retry_seconds=max(1.0, SHUTDOWN_DEADLINE - 3 - self._elapsed_stop()),
                             lease_token=token, reason="worker stopped (SIGTERM)")
        except LeaseLost:
            pass  # already taken back or released by an earlier try
        except ServerUnavailable as exc:
            log.warning("could not release the lease (it will lapse by itself): %s", exc)

    def _elapsed_stop(self):
        return 0.0 if self.stopped_at is None else time.monotonic() - self.stopped_at

    # ---------------------------------------------------------------- groups

    def _provider(self):
        return self.provider_for(self.settings) if self.provider_for else None

    def provision(self, provision, keeper=None):
        """Create the next config's group, then say so. The provisioning lease is renewed while
        the group is created (on the cloud that can outlast a lease period); if the group cannot
        run, the cause is reported and the server backs off its retry (provision_group); if the
        worker dies, the lease lapses and the next one to ask takes it over."""
        provider = self._provider()
        if provider is None:
            log.warning("given the provisioning of %s but no provider is configured here", provision["config"])
            return
        log.info("provisioning the group of %s", provision["config"])
        if provision_group(self.client, provider, provision, self.worker_id, call=self._call, keeper=keeper) is not None:
            return
        failpoint("after_create_group")
        try:
            self._call("provisioned", provision_token=provision["provision_token"], worker_id=self.worker_id)
        except LeaseLost:
            log.info("provisioning of %s was taken over meanwhile", provision["config"])
            return
        self.sweep_templates(provider)

    def provision_all(self, provisions, keeper=None):
        """Create the groups of several configs handed off at once, side by side (creating a
        cloud group means waiting for its first VM); `keeper`, when given, renews their leases."""
        if len(provisions) == 1:
            self.provision(provisions[0], keeper)
            return
        threads = [threading.Thread(target=self.provision, args=(provision, keeper),
                                    name=f"provision-{provision['config']}")
                   for provision in provisions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def stop_for_budget(self, answer):
        """Spend reached the run's budget: nothing more is claimed. The last of the config's
        workers to run something removes its group; the others leave it."""
        log.warning("%s; this worker stops", answer["stop"])
        if answer.get("remove_group"):
            self.remove_own_group(answer["config"])
        else:
            self.leave_group(answer["config"])

    def sweep_templates(self, provider):
        """What finished configs' groups left behind (a gce template), swept by a provisioner
        and by a worker removing its own group."""
        status = self._call("status")
        if status:
            try:
                provider.sweep_templates([config["name"] for config in status["configs"]
                                          if config["state"] == st.CONFIG_DONE])
            except ProviderError as exc:
                log.warning("could not sweep the templates of finished configs: %s", exc)

    def leave_group(self, config):
        """Shrinking: nothing is left to claim and enough of the config's workers stay idle, so
        this one leaves its group (which lowers the group's target size). False if the provider
        refused: the worker stays, and its next claim tells the server it is back."""
        provider = self._provider()
        if provider is not None and self.own_group == config:
            try:
                provider.leave_group(GroupSpec(config), self.worker_id)
            except ProviderError as exc:
                log.error("could not leave the group of %s: %s", config, exc)
                return False
        log.info("nothing left to claim in %s and enough idle workers stay; leaving the group", config)
        return True

    def provision_holding(self, provisions, experiment):
        """Provision the next groups; with pre-warming the same answer gave an experiment, whose
        lease is renewed meanwhile (creating a cloud group can outlast a lease period)."""
        if experiment is None:
            self.provision_all(provisions)
            return
        with LeaseKeeper(self.client, self.lease_seconds, lease_token=experiment["lease_token"]) as keeper:
            self.provision_all(provisions, keeper)  # one renewal for the experiment and the groups

    def remove_own_group(self, config):
        """The config is finished and handed off (or the budget is spent): remove the group
        this worker belongs to. First what finished configs' groups left behind (with configs
        running at once, no provisioner may come after the last ones), then the record, since
        removing the group may end this very process."""
        provider = self._provider()
        if provider is None or self.own_group != config:
            return
        self.sweep_templates(provider)
        self._call("group_deleted", config=config, worker_id=self.worker_id)
        try:
            provider.delete_group(GroupSpec(config))
        except ProviderError as exc:
            log.error("could not delete the group of %s: %s", config, exc)


class Ended(NamedTuple):
    """How a command ended: its exit status (None: it never started), wall seconds, where it
    ran, and the error to report when the status is not 0."""
    status: int | None
    wall: float
    host: dict
    error: str | None


def provisions_of(answer):
    """The provisioning leases of a claim/complete/fail answer: `provisions`, or from a server
    older than concurrent configs its one `provision`."""
    if "provisions" in answer:
        return answer["provisions"]
    return [answer["provision"]] if answer.get("provision") else []


def provision_group(client, provider, provision, owner, *, call=None, keeper=None):
    """Create the group of a provisioning answer, its lease renewed meanwhile (creating a cloud
    group can outlast a lease period). If the provider cannot (the cloud says why the group's
    VMs cannot be made, or none runs in time), the group is removed, still under the lease, and
    the cause reported (`group_failed`, through `call`: default client.call): the server gives
    the lease up until a retry it backs off; or, the zone being out of capacity, answers where
    to try again at once (another zone, standard VMs), which is done. None once the group is
    made; else the ProviderError and the seconds until the retry (None: the lease was taken
    over meanwhile). `keeper`: a LeaseKeeper already renewing the caller's experiment lease, which
    then renews this lease in the same requests."""
    spec = GroupSpec.from_provision(provision)
    kept = (keeper.holding(provision["lease_seconds_left"], provision_token=provision["provision_token"])
            if keeper is not None else LeaseKeeper.of_provision(client, provision))
    with kept:
        try:
            provider.create_group(spec)
            return None
        except ProviderError as exc:
            failure = exc
            log.error("the group of %s cannot run: %s", spec.name, exc)
            try:
                provider.delete_group(spec)
            except ProviderError as cleanup:
                log.error("could not remove the group of %s: %s", spec.name, cleanup)
    try:
        answer = (call or client.call)("group_failed", provision_token=provision["provision_token"],
                                       error=one_line(failure), cause=getattr(failure, "cause", None),
                                       worker_id=owner)
    except LeaseLost:
        log.info("provisioning of %s was taken over meanwhile", spec.name)
        return failure, None
    if answer and answer.get("provision"):
        moved = answer["provision"]
        log.info("the group of %s is tried again in %s%s", spec.name, moved["zone"] or "the run's zone",
                 " with standard VMs" if moved["standard"] else "")
        return provision_group(client, provider, moved, owner, call=call, keeper=keeper)
    return failure, answer and answer["retry_seconds"]


def one_line(error, limit=MAX_CAUSE_TEXT):
    """An error's message as one line, cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class LeaseKeeper(threading.Thread):
    """Renews a worker's leases, experiments' (`lease_token=`) and provisioning leases
    (`provision_token=`), at RENEW_FRACTION of the shortest period until stopped: all of them in
    one `renew` (one lease alone in the form every server knows). A lease refused LEASE_LOST has
    its `lost` event set and is renewed no more. An unreachable server is retried until the next
    renewal is due, then tried again."""

    def __init__(self, client, period, **lease):
        super().__init__(daemon=True, name="lease-keeper")
        self.client = client
        self._held = {}  # the lease's token field and value -> (lease, interval, lost)
        self._changed = threading.Event()
        self._done = threading.Event()
        self._one_by_one = False  # the server knows only the single form
        self.lost = self.add(period, **lease)

    def add(self, period, **lease):
        """Keep one more lease from now on; its `lost` event."""
        lost = threading.Event()
        self._held[tuple(lease.items())] = (lease, period * settings_mod.RENEW_FRACTION, lost)
        self._changed.set()
        return lost

    @contextlib.contextmanager
    def holding(self, period, **lease):
        """Keep `lease` too while the block runs."""
        self.add(period, **lease)
        try:
            yield self
        finally:
            self._held.pop(tuple(lease.items()), None)

    def run(self):
        due = float("inf")
        while not self._done.is_set():
            held = list(self._held.values())
            interval = min((entry[1] for entry in held), default=None)
            if interval is None:  # every lease lost or given back: wait for one to come
                self._changed.clear()
                if not self._held:
                    self._changed.wait()
                continue
            if self._changed.is_set():  # a lease came: renewed within its interval
                self._changed.clear()
                due = min(due, time.monotonic() + interval)
            if not self._wait(due):
                continue
            self._renew(held, interval)
            due = time.monotonic() + interval

    def _wait(self, due):
        """Sleep until `due`; False when stopped or a lease came meanwhile."""
        self._changed.wait(max(0.0, due - time.monotonic()))
        return not (self._done.is_set() or self._changed.is_set())

    def _renew(self, held, interval):
        try:
            if len(held) > 1 and not self._one_by_one:
                try:
                    answer = self.client.call("renew", retry_seconds=interval, leases=[lease for lease, _, _ in held])
                except BadInput:  # a server from before the list form
                    self._one_by_one = True
                else:
                    for entry, renewed in zip(held, answer["leases"]):
                        if not renewed["ok"] and renewed["error"]["code"] == LeaseLost.code:
                            self._lose(entry)
                    return
            for entry in held:
                try:
                    self.client.call("renew", retry_seconds=interval, **entry[0])
                except LeaseLost:
                    self._lose(entry)
        except ServerUnavailable as exc:
            log.warning("could not renew the lease: %s", exc)

    def _lose(self, entry):
        lease, _, lost = entry
        self._held.pop(tuple(lease.items()), None)
        lost.set()

    @classmethod
    def of_provision(cls, client, provision):
        """A keeper of the provisioning lease in a `claim`/`complete` answer."""
        return cls(client, provision["lease_seconds_left"], provision_token=provision["provision_token"])

    def stop(self):
        self._done.set()
        self._changed.set()
        self.join()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_):
        self.stop()


def read_result(path):
    """The command's result: the JSON object in SDM_RESULT_FILE, or {} when it wrote none."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {}
    if size > MAX_RESULT_BYTES:
        raise SdmPeerError(f"the result file is {size} bytes; at most {MAX_RESULT_BYTES} are allowed")
    try:
        result = json.loads(path.read_bytes(), parse_constant=_refuse_non_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SdmPeerError(f"the result file is not valid JSON: {exc}") from None
    if not isinstance(result, dict):
        raise SdmPeerError(f"the result file must hold a JSON object, not {type(result).__name__}")
    return result


def _refuse_non_finite(constant):
    raise ValueError(f"{constant} is not a JSON number (write null instead)")


def _wait_with_usage(process, timeout):
    """Wait up to `timeout` seconds for the command to end; its resource usage (wait4) once it
    has, else None. The usage is this command's alone (its peak memory where no cgroup counts it)."""
    deadline, delay = time.monotonic() + timeout, 0.0005
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _terminate(process):
    """SIGTERM to the command's whole process group, SIGKILL after a grace period."""
    for signum, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path):
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - ERROR_TAIL_BYTES))
        return handle.read().decode("utf-8", "replace").strip()


def _safe(key):
    """A key as a directory name: nothing that climbs out or hides."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip(".") or "_"

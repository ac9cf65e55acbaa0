"""Each command confined to its shape, and where it ran (DESIGN §9).

With the local provider a worker's command gets `cores` CPUs that no other running worker of
the run has (a small allocator: a JSON file under the run's work directory, guarded by an
flock, whose holders are named by pid and process start time, so a killed worker's CPUs come
free), and, where the cgroup tree is writable, a cgroup of its own with those CPUs and the
shape's memory as its limit (BenchExec's way of timing fairly). Both cgroup layouts: v2
(`cpuset.cpus`, `memory.max`, `memory.events`, `memory.peak`) and v1 or hybrid (the cpuset and
memory controllers' own trees). Without a writable tree, CPU affinity alone. New groups are made
inside the worker's own cgroup, so whatever limits the worker has still hold.

Every attempt also records where it ran: the CPU model, the CPUs it had, the confinement, the
steal time on those CPUs over the attempt and the command's peak memory."""

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, SdmPeerError

log = logging.getLogger("sdm_peer.confine")

CONFINEMENTS = ("auto", "cgroup", "affinity", "none")
CGROUP_ROOT = Path(os.environ.get("SDM_CGROUP_ROOT", "/sys/fs/cgroup"))
GROUP_PREFIX = "sdm-peer-"
ALLOCATION_FILE = "cpus.json"
WAIT_POLL = 0.2  # seconds between looks at the allocation while waiting for free CPUs
GIB = 1024 ** 3
# Beyond this share of an attempt's CPU time stolen by the hypervisor, its timing is not the shape's.
STEAL_LIMIT = 0.05


def cpu_list(cpus):
    """{0, 1, 2, 5} -> "0-2,5", as the kernel writes CPU lists."""
    ranges = []
    for _, run in itertools.groupby(enumerate(sorted(cpus)), lambda pair: pair[1] - pair[0]):
        run = [cpu for _, cpu in run]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(ranges)


def parse_cpu_list(text):
    """"0-2,5" -> {0, 1, 2, 5}."""
    cpus = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def shape_environment(cores, memory_gb, environ):
    """What the command is told of its shape: SDM_CORES and SDM_MEMORY_GB always, and the thread
    counts of OpenMP, OpenBLAS, MKL and R's mc.cores unless the user set them already."""
    cores = str(cores)
    threads = {name: cores for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MC_CORES")
               if name not in environ}
    return {"SDM_CORES": cores, "SDM_MEMORY_GB": f"{memory_gb:g}", **threads}


# ---------------------------------------------------------------- the machine

def machine_memory_bytes():
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")) * 1024


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (None where it gives none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return None


def uptime_seconds():
    """Seconds since this machine booted."""
    with open("/proc/uptime") as uptime:
        return round(float(uptime.read().split()[0]), 1)


def steal_ticks(cpus):
    """The hypervisor's steal time so far on these CPUs, in clock ticks (/proc/stat's 8th field)."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    try:
        with open("/proc/stat") as stat:
            return sum(int(fields[8]) for fields in map(str.split, stat)
                       if fields and fields[0] in wanted and len(fields) > 8)
    except OSError:
        return 0


def refuse_bigger_than_machine(shapes, confine):
    """A shape this machine cannot give (more cores or memory than it has) is refused, unless
    the run does without confinement (`confine=none`)."""
    if confine == "none":
        return
    cores, memory = len(os.sched_getaffinity(0)), machine_memory_bytes()
    too_big = [f"c{c}-m{m:g}" for c, m in sorted(set(shapes)) if c > cores or m * GIB > memory]
    if too_big:
        raise BadInput(f"{len(too_big)} config shape(s) are bigger than this machine ({cores} CPUs, "
                       f"{memory / GIB:.1f} GB): {', '.join(too_big[:5])}",
                       hint="shrink those rows in the plan, or --set confine=none to run them unconfined")


# ---------------------------------------------------------------- cgroups

def _mounts():
    """(filesystem type, super options, mount point) of every cgroup mount of this process."""
    mounts = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fstype, _, options = after.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((fstype, set(options.split(",")), Path(before.split()[4])))
    return mounts


def _own_paths():
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path.lstrip("/")
    return paths


@dataclass(frozen=True)
class Layout:
    """Where this worker's groups go: for v2 one directory (cpuset and memory share it), for v1
    the cpuset controller's and the memory controller's own."""

    version: int
    cpuset: Path
    memory: Path

    @classmethod
    def detect(cls):
        """The writable layout this process can make groups in, or (None, why not)."""
        try:
            mounts, own = _mounts(), _own_paths()
        except OSError as exc:
            return None, f"cannot read this process's cgroups: {exc}"
        reasons = []
        for fstype, _, point in mounts:
            if fstype == "cgroup2" and "" in own:
                layout, why = cls._v2(point / own[""])
                if layout:
                    return layout, None
                reasons.append(why)
        v1 = {controller: point / own[controller] for fstype, options, point in mounts if fstype == "cgroup"
              for controller in ("cpuset", "memory") if controller in options and controller in own}
        if len(v1) == 2:
            layout = cls(1, v1["cpuset"], v1["memory"])
            why = layout._probe()
            if why is None:
                return layout, None
            reasons.append(why)
        else:
            reasons.append("no cgroup v1 cpuset and memory controllers mounted")
        return None, "; ".join(reasons)

    @classmethod
    def _v2(cls, base):
        try:
            controllers = (base / "cgroup.controllers").read_text().split()
        except OSError as exc:
            return None, f"cgroup v2 at {base}: {exc.strerror}"
        if not {"cpuset", "memory"} <= set(controllers):
            return None, f"cgroup v2 at {base} does not offer the cpuset and memory controllers"
        subtree = base / "cgroup.subtree_control"
        try:
            if not {"cpuset", "memory"} <= set(subtree.read_text().split()):
                subtree.write_text("+cpuset +memory")
        except OSError as exc:  # EBUSY: the worker's own group holds processes (v2's no-internal-process rule)
            return None, f"cgroup v2 at {base}: cannot enable cpuset and memory for new groups ({exc.strerror})"
        layout = cls(2, base, base)
        why = layout._probe()
        return (None, why) if why else (layout, None)

    def _probe(self):
        """None if a group can be made and removed in each directory, else why not."""
        for base in {self.cpuset, self.memory}:
            probe = base / f"{GROUP_PREFIX}probe-{os.getpid()}"
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError as exc:
                return f"cgroup v{self.version}: cannot make groups in {base} ({exc.strerror})"
        return None

    def directories(self, name):
        return list(dict.fromkeys([self.cpuset / name, self.memory / name]))

    def remove_stale(self):
        """Remove the groups of workers that are gone (killed before they cleaned up), with any
        command left running in them."""
        for base in {self.cpuset, self.memory}:
            for directory in base.glob(GROUP_PREFIX + "*"):
                holder = directory.name[len(GROUP_PREFIX):].split("-")[0]
                if holder.isdigit() and not _process_exists(int(holder)):
                    _remove_group(directory)


class Cgroup:
    """One attempt's group: its CPUs, its memory limit; why it ended (OOM) and its peak memory."""

    def __init__(self, layout, name, cpus, memory_bytes):
        self.layout, self.memory_bytes = layout, memory_bytes
        self.directories = layout.directories(name)
        for directory in self.directories:
            directory.mkdir()
        cpuset, memory = layout.cpuset / name, layout.memory / name
        try:
            if layout.version == 1:
                (cpuset / "cpuset.mems").write_text((layout.cpuset / "cpuset.mems").read_text())
                (cpuset / "cpuset.cpus").write_text(cpu_list(cpus))
                (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
                _write_if_present(memory / "memory.memsw.limit_in_bytes", memory_bytes)  # no swapping past it
            else:
                (cpuset / "cpuset.cpus").write_text(cpu_list(cpus))
                (memory / "memory.max").write_text(str(memory_bytes))
                _write_if_present(memory / "memory.swap.max", 0)
        except OSError:
            self.remove()
            raise

    def enter(self):
        """In the command's process before exec: move itself into the group. os.write only: no
        Python locks after fork."""
        pid = str(os.getpid()).encode()
        for directory in self.directories:
            fd = os.open(directory / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def oom_kills(self):
        """How many processes of the group the kernel's OOM killer ended."""
        memory = self.directories[-1]
        name = "memory.events" if self.layout.version == 2 else "memory.oom_control"
        try:
            counts = dict(line.split() for line in (memory / name).read_text().splitlines() if line.strip())
        except OSError:
            return 0
        if "oom_kill" in counts:
            return int(counts["oom_kill"])
        # Kernels before 4.13 have no v1 oom_kill count: a limit that was hit counts as one.
        return int(_read_number(memory / "memory.failcnt") or 0) > 0

    def peak_bytes(self):
        memory = self.directories[-1]
        return _read_number(memory / ("memory.peak" if self.layout.version == 2 else "memory.max_usage_in_bytes"))

    def remove(self):
        for directory in self.directories:
            _remove_group(directory)


def _write_if_present(path, value):
    if path.exists():
        try:
            path.write_text(str(value))
        except OSError as exc:  # memsw needs swap accounting; without swap there is nothing to bound
            log.debug("%s: %s", path, exc.strerror)


def _read_number(path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _remove_group(directory):
    """Kill what still runs in a group (a command's leftover children), then remove it."""
    for _ in range(50):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove %s: %s", directory, exc.strerror)
                return
        try:
            pids = [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # the killed processes leave the group once the kernel has reaped them
    log.warning("cannot remove %s: processes remain in it", directory)


# ---------------------------------------------------------------- CPU allocation

def _start_time(pid):
    """The process's start time in clock ticks since boot (None: no such process); with the pid
    it names one process, whatever pid reuse follows."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_exists(pid):
    return _start_time(pid) is not None


def _holder(pid=None):
    pid = pid or os.getpid()
    return f"{pid}:{_start_time(pid)}"


def _holder_alive(holder):
    pid, _, started = holder.partition(":")
    return str(_start_time(int(pid))) == started


class CpuAllocator:
    """CPUs held by the run's running workers, in RUNDIR/work/cpus.json: {"held": {holder: [cpu,
    ...]}, "queue": [holder, ...]}. A worker waits its turn (first come, first served, so a
    many-core shape is not starved by one-core ones) until enough CPUs are free."""

    def __init__(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path, self.lock = directory / ALLOCATION_FILE, directory / (ALLOCATION_FILE + ".lock")

    @contextlib.contextmanager
    def _state(self):
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            held = {holder: cpus for holder, cpus in state.get("held", {}).items() if _holder_alive(holder)}
            queue = [holder for holder in state.get("queue", []) if _holder_alive(holder)]
            state = {"held": held, "queue": queue}
            yield state
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(state))
            temporary.replace(self.path)

    def acquire(self, count, give_up):
        """`count` CPUs of this worker's own, none held by another; None if `give_up()` turns true first."""
        usable = sorted(os.sched_getaffinity(0))
        if count > len(usable):
            raise BadInput(f"this shape needs {count} CPUs; this worker may use {len(usable)}",
                           hint="--set confine=none runs it unconfined")
        me = _holder()
        while True:
            with self._state() as state:
                state["held"].pop(me, None)  # a lapsed attempt of ours that never released
                if me not in state["queue"]:
                    state["queue"].append(me)
                taken = {cpu for cpus in state["held"].values() for cpu in cpus}
                free = [cpu for cpu in usable if cpu not in taken]
                if state["queue"][0] == me and len(free) >= count:
                    state["queue"].remove(me)
                    state["held"][me] = free[:count]
                    return set(free[:count])
            if give_up():
                with self._state() as state:
                    state["queue"] = [holder for holder in state["queue"] if holder != me]
                return None
            time.sleep(WAIT_POLL)

    def release(self):
        with self._state() as state:
            state["held"].pop(_holder(), None)


# ---------------------------------------------------------------- one worker's confinement

@dataclass
class Placement:
    """Where one attempt runs: its CPUs, its cgroup (or None) and how it is confined."""

    cpus: set
    confinement: str
    cgroup: Cgroup | None = None
    steal_at_start: int = field(default=0)

    def preexec(self):
        """Run in the command's process between fork and exec."""
        if self.cgroup is not None:
            self.cgroup.enter()
        elif self.confinement == "affinity":
            os.sched_setaffinity(0, self.cpus)

    def facts(self, rusage=None):
        """The attempt's host_* fields, read once the command has ended."""
        peak = self.cgroup.peak_bytes() if self.cgroup is not None else None
        if peak is None and rusage is not None:
            peak = rusage.ru_maxrss * 1024  # Linux reports KiB
        steal = (steal_ticks(self.cpus) - self.steal_at_start) / os.sysconf("SC_CLK_TCK")
        return {"cpu_model": cpu_model(), "cpus": cpu_list(self.cpus), "confinement": self.confinement,
                "steal_seconds": round(steal, 2), "max_rss_mb": None if peak is None else round(peak / 2**20, 1)}

    def oom_error(self):
        """The error text when the kernel killed the command at its memory limit, else None."""
        if self.cgroup is None or not self.cgroup.oom_kills():
            return None
        return (f"OOM: the command was killed by the kernel's out-of-memory killer at its memory limit of "
                f"{self.cgroup.memory_bytes / GIB:g} GB (the shape's memory)")


class Confiner:
    """One worker's confinement: `cgroup`, `affinity` or `none`, decided once at its start."""

    def __init__(self, confine, cores, memory_gb, work_root):
        self.cores, self.memory_bytes = cores, int(memory_gb * GIB)
        self.layout = None
        self.counter = itertools.count(1)
        if confine in ("auto", "cgroup"):
            self.layout, why = Layout.detect()
            if self.layout is None:
                if confine == "cgroup":
                    raise SdmPeerError(f"confine=cgroup, but no writable cgroup tree: {why}",
                                       hint="run as a user who may create cgroups, or --set confine=affinity")
                log.info("no writable cgroup tree (%s): confining by CPU affinity", why)
            else:
                self.layout.remove_stale()
        self.kind = "none" if confine == "none" else "cgroup" if self.layout else "affinity"
        self.allocator = None if self.kind == "none" else CpuAllocator(work_root)
        log.info("commands are confined by %s%s", self.kind,
                 f" (cgroup v{self.layout.version})" if self.layout else "")

    @classmethod
    def for_settings(cls, settings, cores, memory_gb, work_root):
        """Confinement is the local provider's: elsewhere the machine is the shape."""
        confine = settings.get("confine", "auto") if settings.get("provider") == "local" else "none"
        return cls(confine, cores, memory_gb, work_root)

    @contextlib.contextmanager
    def placed(self, give_up):
        """Take CPUs (waiting for them), make the attempt's group; give both back afterwards.
        Yields None if `give_up()` turns true while it waits."""
        if self.allocator is None:
            placement = Placement(os.sched_getaffinity(0), "none")
        else:
            cpus = self.allocator.acquire(self.cores, give_up)
            if cpus is None:
                yield None
                return
            placement = Placement(cpus, self.kind)
        try:
            if self.layout is not None:
                name = f"{GROUP_PREFIX}{os.getpid()}-{next(self.counter)}"
                placement.cgroup = Cgroup(self.layout, name, placement.cpus, self.memory_bytes)
            placement.steal_at_start = steal_ticks(placement.cpus)
            yield placement
        finally:
            if placement.cgroup is not None:
                placement.cgroup.remove()
            if self.allocator is not None:
                self.allocator.release()

"""`sdm-peer simulate`: the original study's shape in accelerated simulated time (issue 9).

84,400 experiments over 2,000 hardware shapes (~42 each), run-times drawn from a lognormal
whose mean falls with cores (and a little with memory), VMs that take BOOT_SECONDS to boot and
are preempted at a rate per VM-hour, shutdown scripts that do not fire SHUTDOWN_SCRIPT_MISSES of
the time. A discrete-event loop moves a simulated clock and passes it as `now` to the real
store.py (each scenario its own SQLite file), so the comparison runs sdm-peer's own claim,
lease, hand-off, pre-warm and shrink logic, not a model of it. Three scenarios:

* `replaced`: the design sdm-peer replaces. A master polls every MASTER_POLL seconds and builds
  one pool per shape when the previous one is DONE; claims carry no lease that lapses; a
  preempted VM whose shutdown script did not fire leaves its row STARTED until a person fixes
  it PERSON_DELAY later (one intervention), and the pool waits for that row, fully billed.
* `sdm-peer`: leases (a lapsed one is taken back by the next claim of its config), the worker
  that finishes a config provisions the next group and removes its own.
* `sdm-peer+prewarm+shrink`: the same with the `prewarm` and `shrink` settings.
* `sdm-peer+max_vcpus` (with `max_vcpus`): the same, configs running concurrently while their
  groups fit `max_vcpus`, each finishing config handing off to as many as its freed vCPUs hold
  (the store's `provisions`). A config whose one VM needs more is refused up front and left out
  of every scenario (reported in the parameters), as `init` would refuse it.

Each result adds `cost_usd` (every VM's alive time, a minute at least, at the spot price of its
shape's Compute Engine family in prices.py, plus the database VM for the makespan) and, with
`max_vcpus`, `bound_hours` (the study's core-hours / max_vcpus, plus one boot: no schedule can
finish sooner) and `makespan_to_bound`.

What is simulated of a worker mirrors worker.py: claim, run, report, claim again at once; with
nothing to claim, wait with the same backoff (or until the next lease may lapse). Renewals are
applied lazily (a running attempt's lease is brought up to its last renewal tick before any
claim of its config), which leaves every claim's view of the leases exactly as with renewals
every third of a lease period, at a fraction of the calls."""

import dataclasses
import heapq
import itertools
import json
import math
import random
import tempfile
import time
from pathlib import Path

from . import settings as settings_mod
from . import states as st
from .plan import Config, Experiment, Plan
from .prices import MINIMUM_SECONDS, spend_usd
from .store import Store, config_name
from .worker import IDLE_BACKOFF, POLL, provisions_of

FULL_EXPERIMENTS = 84_400
FULL_CONFIGS = 2_000
CORES = range(1, 41)  # 40 core counts x 50 memory sizes = the study's 2,000 shapes
BOOT_SECONDS = 60.0
MASTER_POLL = 30.0  # the replaced master's (and its workers') polling period
PERSON_DELAY = 8 * 3600.0  # a stuck STARTED row waits this long for a person
SHUTDOWN_SCRIPT_MISSES = 0.10
LEASE_SECONDS = float(settings_mod.DEFAULT_LEASE_SECONDS)
RENEW_SECONDS = LEASE_SECONDS * settings_mod.RENEW_FRACTION
NEVER_LAPSES = 10 * 365 * 86400.0  # the replaced design's claims: a STARTED row stays STARTED
RUNTIME_SIGMA = 0.6  # lognormal spread: a few stragglers per group
SCENARIOS = ("replaced", "sdm-peer", "sdm-peer+prewarm+shrink")
CONCURRENT = "sdm-peer+max_vcpus"  # run beside SCENARIOS when max_vcpus is given
BILLED_AS = {"provider": "gce"}  # spot VMs of each shape's Compute Engine family, and the database VM


def mean_runtime(cores, memory_gb):
    """Seconds: an hour on 1 core and 1 GB, falling with cores (imperfect scaling) and a little
    with memory (less swapping)."""
    return 1200.0 * cores ** -0.6 * (1 + 2 / memory_gb)


def study(scale, group_size, rng):
    """The plan: configs in run order and, per experiment, its run-time (in its params)."""
    configs = max(1, round(FULL_CONFIGS * scale))
    experiments = max(configs, round(FULL_EXPERIMENTS * scale))
    plan = Plan()
    for index in range(configs):
        cores, memory_gb = CORES[index % len(CORES)], 1 + index // len(CORES)
        name = config_name(cores, memory_gb)
        plan.configs.append(Config(name, cores, memory_gb, group_size))
        mean = mean_runtime(cores, memory_gb)
        mu = math.log(mean) - RUNTIME_SIGMA ** 2 / 2
        count = experiments * (index + 1) // configs - experiments * index // configs
        for number in range(count):
            plan.experiments.append(Experiment(f"{name}-{number}", name,
                                               {"runtime": round(rng.lognormvariate(mu, RUNTIME_SIGMA), 1)}))
    return plan


@dataclasses.dataclass(eq=False)
class Vm:
    id: str
    group: "Group"
    created: float
    ended: float = None
    attempt: "Attempt" = None
    idle_wait: float = IDLE_BACKOFF[0]


@dataclasses.dataclass(eq=False)
class Group:
    config: dict
    vms: set = dataclasses.field(default_factory=set)
    deleted: bool = False


@dataclasses.dataclass(eq=False)
class Attempt:
    token: str
    config: str
    claimed: float
    runtime: float
    lease_until: float  # the expiry the store holds


class Simulation:
    """One scenario over its own database; `run()` returns its measures."""

    def __init__(self, scenario, plan, directory, *, seed, preemptions_per_vm_hour, max_vcpus=None):
        self.scenario = scenario
        self.replaced = scenario == "replaced"
        self.rng = random.Random(seed)
        self.preemption_rate = preemptions_per_vm_hour / 3600.0
        self.now = 0.0
        self.queue, self.sequence = [], itertools.count()
        self.vm_numbers = itertools.count(1)
        self.groups = {}
        self.running = {}  # config -> {token: Attempt} of live VMs, for the lazy renewals
        self.idle = {}  # config -> [(VM, when it last polled)]: the replaced design's idle workers
        self.configs = [dataclasses.asdict(config) for config in plan.configs]
        self.measures = dict.fromkeys(("vm_seconds", "busy_seconds", "rerun_seconds"), 0.0)
        self.counts = dict.fromkeys(("preemptions", "shutdown_script_misses", "interventions", "vms"), 0)
        self.vm_lives = []  # (cores, memory_gb, standard, seconds billed) of every VM gone
        tuned = scenario in ("sdm-peer+prewarm+shrink", CONCURRENT)
        settings = {"provider": "none" if self.replaced else "local",
                    "lease_seconds": NEVER_LAPSES if self.replaced else LEASE_SECONDS,
                    "max_interruptions": 1000,  # a preemption is not the experiment's fault
                    "prewarm": tuned, "shrink": tuned}
        if scenario == CONCURRENT:
            settings["max_vcpus"] = max_vcpus
        self.store = Store(Path(directory) / f"{scenario}.db")
        self.store.import_plan(plan, settings=settings, now=0.0)
        self.lease_seconds = settings["lease_seconds"]

    # ------------------------------------------------------------ the event loop

    def at(self, moment, action, *args):
        heapq.heappush(self.queue, (moment, next(self.sequence), action, args))

    def run(self):
        started = time.monotonic()
        if self.replaced:
            self.master_poll(0)
        else:
            self.provision(self.store.acquire_provisioning("bootstrap", now=self.now))
        while self.queue:
            self.now, _, action, args = heapq.heappop(self.queue)
            action(*args)
        unfinished = [c["name"] for c in self.configs if self.store.config_state(c["name"]) != st.CONFIG_DONE]
        assert not unfinished, f"{self.scenario}: configs left unfinished: {unfinished[:5]}"
        makespan = max(event["at"] for event in self.store.events(kind="config_done"))
        self.store.close()
        hours = {key.replace("_seconds", "_hours"): round(value / 3600, 2) for key, value in self.measures.items()}
        return {"scenario": self.scenario, "makespan_hours": round(makespan / 3600, 2),
                "cost_usd": round(spend_usd(BILLED_AS, self.vm_lives, makespan), 2),
                "vm_hours_billed": hours["vm_hours"],
                "idle_vm_hours": round((self.measures["vm_seconds"] - self.measures["busy_seconds"]) / 3600, 2),
                "rerun_hours": hours["rerun_hours"], "person_interventions": self.counts["interventions"],
                "preemptions": self.counts["preemptions"],
                "shutdown_script_misses": self.counts["shutdown_script_misses"], "vms_started": self.counts["vms"],
                "simulation_seconds": round(time.monotonic() - started, 1)}

    # ------------------------------------------------------------ groups and VMs

    def create_group(self, config):
        """Idempotent, as a provider's create_group: an existing group is kept. `config`'s
        group_size: the VMs the group was given."""
        group = self.groups.get(config["name"])
        if group is not None and not group.deleted:
            return
        group = self.groups[config["name"]] = Group(config)
        for _ in range(config["group_size"]):
            self.boot_vm(group)

    def boot_vm(self, group):
        vm = Vm(f"{group.config['name']}-vm{next(self.vm_numbers)}", group, self.now)
        group.vms.add(vm)
        self.counts["vms"] += 1
        self.at(self.now + BOOT_SECONDS, self.claim, vm)
        if self.preemption_rate:
            self.at(self.now + self.rng.expovariate(self.preemption_rate), self.preempt, vm)

    def end_vm(self, vm):
        vm.ended = self.now
        vm.group.vms.discard(vm)
        self.measures["vm_seconds"] += vm.ended - vm.created
        config = vm.group.config
        self.vm_lives.append((config["cores"], config["memory_gb"], False,
                               max(vm.ended - vm.created, MINIMUM_SECONDS)))

    def delete_group(self, group):
        group.deleted = True
        for vm in list(group.vms):
            self.end_vm(vm)

    def preempt(self, vm):
        """A spot preemption: the VM goes (its group re-creates one); its shutdown script gives
        its lease back, unless the script does not fire."""
        if vm.ended is not None:
            return
        self.counts["preemptions"] += 1
        attempt = vm.attempt
        self.end_vm(vm)
        if attempt is not None:
            lost = self.now - attempt.claimed
            self.measures["busy_seconds"] += lost
            self.measures["rerun_seconds"] += lost
            self.running[attempt.config].pop(attempt.token)
        if self.rng.random() >= SHUTDOWN_SCRIPT_MISSES:
            if self.store.release(now=self.now, reason="preempted", worker_id=vm.id)["released"]:
                self.wake_idle(vm.group.config["name"])
        else:
            self.counts["shutdown_script_misses"] += 1
            if attempt is not None:
                self.missed_shutdown(vm, attempt)
        if not vm.group.deleted:
            self.boot_vm(vm.group)

    def missed_shutdown(self, vm, attempt):
        if self.replaced:  # the row stays STARTED until a person notices
            self.at(self.now + PERSON_DELAY, self.person_fixes, vm.id)
        else:  # the lease lapses a lease period after the last renewal the VM made
            self.renew_up_to(attempt, self.now)

    def person_fixes(self, worker_id):
        released = self.store.release(now=self.now, reason="fixed by hand", worker_id=worker_id)
        self.counts["interventions"] += released["released"]
        self.wake_idle(worker_id.rpartition("-vm")[0])

    def wake_idle(self, config):
        """The replaced design's idle workers of a config, at their next poll after now."""
        for vm, polled in self.idle.pop(config, ()):
            self.at(polled + math.ceil((self.now - polled) / MASTER_POLL) * MASTER_POLL, self.claim, vm)

    # ------------------------------------------------------------ a worker

    def claim(self, vm):
        if vm.ended is not None:
            return
        config = vm.group.config
        self.renew_running(config["name"])
        answer = self.store.claim(vm.id, config["cores"], config["memory_gb"], now=self.now,
                                  lease_seconds=self.lease_seconds)
        self.provision(answer)
        experiment = answer["experiment"]
        if experiment:
            runtime = experiment["params"]["runtime"]
            vm.attempt = Attempt(experiment["lease_token"], config["name"], self.now, runtime,
                                 self.now + self.lease_seconds)
            self.running.setdefault(config["name"], {})[vm.attempt.token] = vm.attempt
            vm.idle_wait = IDLE_BACKOFF[0]
            self.at(self.now + runtime, self.report, vm)
        elif self.replaced:
            # It polls every MASTER_POLL seconds; until a row of its config comes back (a release,
            # a person's fix) those polls find nothing, so only the first poll after that is run.
            self.idle.setdefault(config["name"], []).append((vm, self.now))
        elif answer["leave"]:  # its group's target size drops with it: it is not re-created
            self.end_vm(vm)
        elif answer["config_done"] and not answer["handoff_pending"]:
            self.store.group_deleted(config["name"], now=self.now, worker_id=vm.id)
            self.delete_group(vm.group)
        else:
            wait = vm.idle_wait if answer["retry_after"] is None else min(vm.idle_wait, answer["retry_after"] + POLL)
            vm.idle_wait = min(vm.idle_wait * 2, IDLE_BACKOFF[1])
            self.at(self.now + wait, self.claim, vm)

    def report(self, vm):
        attempt = vm.attempt
        if vm.ended is not None or attempt is None:
            return
        vm.attempt = None
        self.running[attempt.config].pop(attempt.token)
        self.measures["busy_seconds"] += attempt.runtime
        self.provision(self.store.complete(attempt.token, {}, attempt.runtime, now=self.now))
        self.claim(vm)

    def provision(self, answer):
        """Create the group of each provisioning lease the store's answer gives, of the VMs it
        was given, and report it made."""
        for provision in provisions_of(answer):
            config = next(c for c in self.configs if c["name"] == provision["config"])
            self.create_group({**config, "group_size": provision["group_size"]})
            self.store.provisioned(provision["provision_token"], now=self.now)

    # ------------------------------------------------------------ leases

    def renew_running(self, config):
        """Bring every live attempt's lease of the config up to its last renewal tick, where
        the store would otherwise see it lapsed."""
        for attempt in self.running.get(config, {}).values():
            if attempt.lease_until <= self.now:
                self.renew_up_to(attempt, self.now)

    def renew_up_to(self, attempt, moment):
        tick = attempt.claimed + math.floor((moment - attempt.claimed) / RENEW_SECONDS) * RENEW_SECONDS
        if tick + self.lease_seconds > attempt.lease_until:
            self.store.renew(lease_token=attempt.token, now=tick, lease_seconds=self.lease_seconds)
            attempt.lease_until = tick + self.lease_seconds

    # ------------------------------------------------------------ the replaced design's master

    def master_poll(self, index):
        """Every MASTER_POLL seconds: is the current pool's config DONE? Then delete the pool
        and build the next one."""
        current = self.configs[index]
        if current["name"] not in self.groups:
            self.create_group(current)
        elif self.store.config_state(current["name"]) == st.CONFIG_DONE:
            self.delete_group(self.groups[current["name"]])
            index += 1
            if index == len(self.configs):
                return
            self.create_group(self.configs[index])
        self.at(self.now + MASTER_POLL, self.master_poll, index)


def simulate(*, scale=1.0, seed=1, group_size=5, preemptions_per_vm_hour=0.05, scenarios=SCENARIOS, directory=None,
             max_vcpus=None):
    """Run each scenario on the same study and the same seed (and, with `max_vcpus`, the
    concurrent one beside them); returns {"parameters", "results"}."""
    if not 0 < scale <= 1:
        raise ValueError("scale must be in (0, 1]")
    plan, refused = fitting(study(scale, group_size, random.Random(seed)), max_vcpus)
    if not plan.configs:
        raise ValueError(f"no config of the study fits max_vcpus {max_vcpus}")
    if max_vcpus is not None:
        scenarios = (*scenarios, CONCURRENT)
    parameters = {"seed": seed, "scale": scale, "max_vcpus": max_vcpus,
                  "refused_configs": len(refused.configs), "refused_experiments": len(refused.experiments),
                  "experiments": len(plan.experiments), "configs": len(plan.configs),
                  "group_size": group_size, "boot_seconds": BOOT_SECONDS,
                  "preemptions_per_vm_hour": preemptions_per_vm_hour,
                  "shutdown_script_misses": SHUTDOWN_SCRIPT_MISSES, "person_delay_hours": PERSON_DELAY / 3600,
                  "master_poll_seconds": MASTER_POLL, "lease_seconds": LEASE_SECONDS,
                  "mean_runtime_seconds": round(sum(e.params["runtime"] for e in plan.experiments)
                                                / len(plan.experiments), 1)}
    # Memory-backed when there is one: the databases are scratch, and their commits many.
    directory = directory or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="sdm-simulate-", dir=directory) as scratch:
        results = [Simulation(scenario, plan, scratch, seed=seed, preemptions_per_vm_hour=preemptions_per_vm_hour,
                              max_vcpus=max_vcpus).run() for scenario in scenarios]
    if max_vcpus is not None:
        core_hours = sum(config.cores * sum(e.params["runtime"] for e in plan.experiments if e.config == config.name)
                         for config in plan.configs) / 3600
        parameters["core_hours"] = round(core_hours, 1)
        bound = core_hours / max_vcpus + BOOT_SECONDS / 3600
        for result in results:
            result.update(bound_hours=round(bound, 2), makespan_to_bound=round(result["makespan_hours"] / bound, 2))
    return {"parameters": parameters, "results": results}


def fitting(plan, max_vcpus):
    """(the plan of the configs whose one VM fits max_vcpus, the plan of those refused)."""
    kept, refused = Plan(), Plan()
    for config in plan.configs:
        (kept if max_vcpus is None or config.cores <= max_vcpus else refused).configs.append(config)
    names = {config.name for config in kept.configs}
    for experiment in plan.experiments:
        (kept if experiment.config in names else refused).experiments.append(experiment)
    return kept, refused


COLUMNS = (("scenario", "scenario"), ("makespan_hours", "makespan h"), ("bound_hours", "bound h"),
           ("makespan_to_bound", "makespan / bound"), ("vm_hours_billed", "VM-h billed"),
           ("idle_vm_hours", "idle VM-h"), ("cost_usd", "cost $"), ("rerun_hours", "re-run h"),
           ("person_interventions", "interventions"), ("preemptions", "preemptions"))


def table(outcome):
    """The comparison as a Markdown table (what the README shows), with its seed."""
    columns = [(key, title) for key, title in COLUMNS if key in outcome["results"][0]]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for result in outcome["results"]:
        lines.append("| " + " | ".join(f"{result[key]:,}" if not isinstance(result[key], str) else result[key]
                                       for key, _ in columns) + " |")
    p = outcome["parameters"]
    lines.append(f"\nseed {p['seed']}, scale {p['scale']}: {p['experiments']:,} experiments over {p['configs']:,}"
                 f" configs, groups of {p['group_size']}, mean run-time {p['mean_runtime_seconds']:,} s,"
                 f" {p['preemptions_per_vm_hour']} preemptions per VM-hour")
    if p["max_vcpus"] is not None:
        lines.append(f"max_vcpus {p['max_vcpus']}: {p['core_hours']:,} core-hours; "
                     + (f"{p['refused_configs']:,} configs ({p['refused_experiments']:,} experiments) refused up "
                        f"front: one VM of theirs needs more vCPUs" if p["refused_configs"] else "no config refused"))
    return "\n".join(lines)


def write(outcome, path):
    Path(path).write_text(json.dumps(outcome, indent=2) + "\n")

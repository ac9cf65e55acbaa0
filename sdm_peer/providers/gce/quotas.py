"""The account's limits (DESIGN §8): what the region's and the project's quotas leave free for a
run's groups, and which config can never run under them (pure functions of what `regions.get`
and `projects.get` report).

A worker VM's vCPUs count against CPUS_ALL_REGIONS, and against PREEMPTIBLE_CPUS when it is a
spot VM and that quota is above 0 (a new project's is often 0: its spot VMs then count as
standard ones), else against CPUS and its family's own quota (N2_CPUS, ...). Each VM with an
external address takes one IN_USE_ADDRESSES; each config running takes one managed group and
one instance template. The database VM (an e2-small, 2 vCPUs, standard) runs beside the groups
for the whole run, so its share is set aside. A metric the cloud does not report limits nothing."""

from dataclasses import dataclass

FAMILY_METRIC = {"n2": "N2_CPUS", "n2d": "N2D_CPUS", "e2": "E2_CPUS"}  # N1 counts on CPUS alone
DB_VM_VCPUS = 2
DB_VM_METRICS = ("CPUS", "CPUS_ALL_REGIONS")
PER_CONFIG_METRICS = ("INSTANCE_GROUP_MANAGERS", "INSTANCE_TEMPLATES")  # one of each per running config
ADDRESSES = "IN_USE_ADDRESSES"


@dataclass(frozen=True)
class Quota:
    metric: str
    limit: float
    usage: float
    where: str  # "region us-central1" or "the project"


def cpu_metrics(quotas, family, spot):
    """The reported metrics a VM of this family and provisioning model counts its vCPUs against."""
    preemptible = quotas.get("PREEMPTIBLE_CPUS")
    if spot and preemptible is not None and preemptible.limit > 0:
        metrics = ["CPUS_ALL_REGIONS", "PREEMPTIBLE_CPUS"]
    else:
        metrics = ["CPUS_ALL_REGIONS", "CPUS", FAMILY_METRIC.get(family)]
    return [metric for metric in metrics if metric in quotas]


def set_aside(settings, metric):
    """What the run's database VM takes of `metric`."""
    if metric in DB_VM_METRICS:
        return DB_VM_VCPUS
    return 1 if metric == ADDRESSES and settings["external_ip"] else 0


@dataclass(frozen=True)
class Fit:
    max_vcpus: int  # what the quotas leave free for the groups, at least the biggest shape
    refusals: list  # one sentence per config that can never run, or per quota nothing can run under
    consulted: list  # the Quota of each metric that applies to the run


def fit(settings, configs, quotas, billed_as):
    """Fit a run's configs ((name, cores, memory_gb)) into `quotas` ({metric: Quota});
    `billed_as(settings, cores, memory_gb)` gives a shape's (family, spot)."""
    def room(metric):
        return quotas[metric].limit - set_aside(settings, metric)

    def stated(metric):
        quota = quotas[metric]
        reserved = set_aside(settings, metric)
        return (f"quota {metric} in {quota.where} is {quota.limit:g}"
                + (f", {reserved} of it for the database VM" if reserved else ""))

    refusals, applying = [], set()
    for metric in (*PER_CONFIG_METRICS, *([ADDRESSES] if settings["external_ip"] else [])):
        if metric in quotas:
            applying.add(metric)
            if room(metric) < 1:
                refusals.append(f"no config can run: {stated(metric)}")
    for name, cores, memory_gb in configs:
        for metric in cpu_metrics(quotas, *billed_as(settings, cores, memory_gb)):
            applying.add(metric)
            if cores > room(metric):
                refusals.append(f"config {name} needs {cores} vCPUs; {stated(metric)}")
                break
    free = [quotas[metric].limit - quotas[metric].usage - set_aside(settings, metric)
            for metric in applying if metric not in PER_CONFIG_METRICS and metric != ADDRESSES]
    biggest = max((cores for _, cores, _ in configs), default=1)
    if ADDRESSES in applying:  # one address per VM: no more VMs than that, of at most the biggest shape
        addresses = quotas[ADDRESSES]
        free.append((addresses.limit - addresses.usage - set_aside(settings, ADDRESSES)) * biggest)
    # A shape bigger than what is free now (quota used elsewhere) still gets its turn: its group
    # gives its vCPUs back until the quota frees up.
    max_vcpus = max(int(min(free, default=biggest)), biggest)
    return Fit(max_vcpus, refusals, [quotas[metric] for metric in sorted(applying)])

"""Compute Engine custom machine types from a config's cores × memory (pure functions).

A custom machine type is named `PREFIX-VCPUS-MEMORY_MB` (plus `-ext` when the memory goes past
the family's per-vCPU maximum, "extended memory"). The rules below are Compute Engine's for
custom machine types (the limits of Google's own custom-machine-type samples): the vCPU counts a
family allows, memory a multiple of 256 MB, a per-vCPU minimum and maximum, and a total cap.
GB here is Compute Engine's: 1 GB = 1024 MB.

A shape no family can serve is refused when the run is created (`init`, `bootstrap`), with the
reason for each family, never weeks later when its group is provisioned."""

from dataclasses import dataclass

MEMORY_STEP_MB = 256


@dataclass(frozen=True)
class Family:
    name: str
    prefix: str  # machine type name prefix: N1's custom types have none of their own
    vcpus: frozenset
    vcpus_text: str  # the rule above, in words, for refusals
    min_mb_per_vcpu: int
    max_mb_per_vcpu: int
    max_total_mb: int  # with extended memory where the family has it, else the plain maximum
    extended_memory: bool


def _gb(value):
    return value * 1024


FAMILIES = {
    family.name: family for family in (
        Family("n2", "n2-custom", frozenset([*range(2, 33, 2), *range(36, 129, 4)]),
               "2 to 32 in steps of 2, then 36 to 128 in steps of 4", 512, _gb(8), _gb(624), True),
        Family("n1", "custom", frozenset([1, *range(2, 97, 2)]),
               "1, or 2 to 96 in steps of 2", 922, 6656, _gb(624), True),
        Family("n2d", "n2d-custom", frozenset([2, 4, 8, 16, 32, 48, 64, 80, 96]),
               "2, 4, 8, 16, or 32 to 96 in steps of 16", 512, _gb(8), _gb(768), True),
        Family("e2", "e2-custom", frozenset(range(2, 33, 2)),
               "2 to 32 in steps of 2", 512, _gb(8), _gb(128), False),
    )
}

# Tried in this order when the run names no `machine_family`: N2 first (current general-purpose
# generation), N1 for the shapes only it serves (1 vCPU, odd ratios), then N2D, and E2 last
# (its CPU platform varies most, which blurs timings compared across shapes).
DEFAULT_ORDER = ("n2", "n1", "n2d", "e2")


class UnservableShape(ValueError):
    """No family can serve a shape; the message gives each family's reason."""


def memory_mb(memory_gb):
    """Memory in MB, refused unless it is a whole multiple of 256 MB."""
    megabytes = memory_gb * 1024
    rounded = round(megabytes)
    if abs(megabytes - rounded) > 1e-6 or rounded % MEMORY_STEP_MB or rounded <= 0:
        lower = max(MEMORY_STEP_MB, int(megabytes // MEMORY_STEP_MB) * MEMORY_STEP_MB)
        raise UnservableShape(f"memory {memory_gb:g} GB is not a multiple of 256 MB (0.25 GB);"
                              f" nearest: {lower / 1024:g} or {(lower + MEMORY_STEP_MB) / 1024:g} GB")
    return rounded


def why_not(family, cores, megabytes):
    """The reason `family` cannot serve cores × megabytes, or None when it can."""
    if cores not in family.vcpus:
        return f"{family.name} takes {family.vcpus_text} vCPUs"
    if megabytes < cores * family.min_mb_per_vcpu:
        return f"{family.name} needs at least {family.min_mb_per_vcpu / 1024:.3g} GB per vCPU"
    if megabytes > cores * family.max_mb_per_vcpu and not family.extended_memory:
        return f"{family.name} allows at most {family.max_mb_per_vcpu / 1024:g} GB per vCPU (no extended memory)"
    if megabytes > family.max_total_mb:
        return f"{family.name} allows at most {family.max_total_mb / 1024:g} GB in all"
    return None


def machine_type_name(family, cores, megabytes):
    """The custom machine type string, e.g. `n2-custom-4-16384` or `custom-1-8192-ext`."""
    name = f"{family.prefix}-{cores}-{megabytes}"
    return name + "-ext" if megabytes > cores * family.max_mb_per_vcpu else name


def family_names(machine_family=None):
    if machine_family is None:
        return DEFAULT_ORDER
    if machine_family not in FAMILIES:
        raise ValueError(f"machine_family must be one of {', '.join(DEFAULT_ORDER)}, not {machine_family!r}")
    return (machine_family,)


def custom_machine_type(cores, memory_gb, machine_family=None):
    """The machine type for a shape: in `machine_family` when given, else in the first family
    of DEFAULT_ORDER that serves it. Raises UnservableShape with every family's reason."""
    shape = f"{cores} vCPU x {memory_gb:g} GB"
    try:
        megabytes = memory_mb(memory_gb)
    except UnservableShape as exc:
        raise UnservableShape(f"{shape}: {exc}") from None
    reasons = []
    for name in family_names(machine_family):
        family = FAMILIES[name]
        reason = why_not(family, cores, megabytes)
        if reason is None:
            return machine_type_name(family, cores, megabytes)
        reasons.append(reason)
    raise UnservableShape(f"{shape}: " + "; ".join(reasons))

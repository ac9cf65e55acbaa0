"""The Provider protocol and the registry of providers (DESIGN §6).

A provider makes and removes the group of workers for one config. Adding one is a module (or
package) under providers/ and a line in REGISTRY; the CLI's `bootstrap --provider` choice and
the `provider` setting are read from here. A registered provider is imported only when a run
uses it, so Compute Engine's client library is loaded by gce runs alone."""

from dataclasses import dataclass
from importlib import import_module
from typing import ClassVar, Protocol

from ..errors import BadInput, SettingsError

# name -> "module:class", imported on first use.
REGISTRY = {
    "local": "sdm_peer.providers.local:LocalProvider",
    "gce": "sdm_peer.providers.gce:GceProvider",
}


# The cause a provider gives (ProviderError.cause) when a group's VMs cannot be made because the
# zone is out of capacity: the run moves the group on (DESIGN §8), where another cause waits.
CAPACITY = "capacity"


def run_zones(settings):
    """Where a run's groups go, in the order tried when one is out of capacity: `zone`, then
    the rest of `zones`; none for a provider without zones."""
    if not settings.get("zone"):
        return []
    return [settings["zone"], *(zone for zone in settings.get("zones", []) if zone != settings["zone"])]


@dataclass(frozen=True)
class GroupSpec:
    """One config's group: its name, and for creating it the shape and size of its workers."""

    name: str
    cores: int | None = None
    memory_gb: float | None = None
    group_size: int | None = None
    # Where the group is, for a provider with places (gce: a zone of the run's `zones`; None: the
    # run's own, or for removing, wherever it is), and whether its VMs were made standard after
    # spot_fallback_minutes without spot capacity.
    zone: str | None = None
    standard: bool = False

    @classmethod
    def from_config(cls, config):
        """From an entry of the status object's `configs`: the VMs its group was given, or
        (holding none, or from an older server) its group_size."""
        return cls(config["name"], config["cores"], config["memory_gb"], config.get("vms") or config["group_size"],
                   config.get("zone"), config.get("standard", False))

    @classmethod
    def from_provision(cls, provision):
        """From a provisioning answer (`acquire_provisioning`, a claim's `provision`)."""
        return cls(provision["config"], provision["cores"], provision["memory_gb"], provision["group_size"],
                   provision.get("zone"), provision.get("standard", False))


@dataclass(frozen=True)
class RunOptions:
    """The flags of `bootstrap` and `stop` as given; which of them a run takes is its provider's
    business. None or False: not given."""

    lease_seconds: float | None = None
    http_port: int | None = None
    project: str | None = None
    zone: str | None = None
    bucket: str | None = None
    dry_run: bool = False
    force: bool = False

    def given(self, names):
        return [name for name in names if getattr(self, name) not in (None, False)]


def flag(name):
    return "--" + name.replace("_", "-")


def flags_text(names):
    """--a, --b and --c."""
    flags = [flag(name) for name in names]
    return flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]


class Provider(Protocol):
    """What run.py, the worker and `group up|down` need of a provider. Providers subclass it to
    inherit the defaults below: a run served from this machine, and nothing refused."""

    # The bootstrap and stop flags beyond --lease-seconds and --http-port that the provider's
    # own run-level bootstrap_run and stop_run take (the default ones take none).
    bootstrap_flags: ClassVar[tuple] = ()
    stop_flags: ClassVar[tuple] = ()

    @classmethod
    def for_run(cls, settings, run_dir, token):
        """The provider of a run with these settings, run directory (or None) and token."""
        ...

    def create_group(self, spec: GroupSpec):
        """Make the group of spec.group_size workers; an existing group is success."""
        ...

    def delete_group(self, spec: GroupSpec):
        """Remove the group (its workers give their leases back); a missing group is success."""
        ...

    def leave_group(self, spec: GroupSpec, worker_id):
        """Shrinking: the worker leaves, the group's target size drops by one; a group or a
        worker already gone is success."""
        ...

    def sweep_templates(self, finished):
        """What the groups of the `finished` configs (names) left behind once gone, removed by
        the next provisioner, or by the next worker to remove its own group: a worker that
        deletes its own group can die before it removes the rest (a cloud group's instance
        template). The names of what was removed; by default nothing is left behind."""
        return []

    # The run's own machines, billed beside its groups while it lasts (DESIGN §8), as
    # (price family, vCPUs, GB) of prices.py: a run served from this machine has none.
    run_machines: ClassVar[tuple] = ()

    @classmethod
    def default_max_vcpus(cls, settings, shapes):
        """max_vcpus when the run sets none (DESIGN §8); None: configs one after another."""
        return None

    @classmethod
    def billed_as(cls, settings, cores, memory_gb):
        """(the prices.py family, spot or not) a worker of this shape is billed as: `local`,
        standard, by default."""
        return "local", False

    @classmethod
    def check_run(cls, settings, shapes):
        """Refuse, before anything is written, a run this provider cannot serve: `settings` are
        the run's (stored and new), `shapes` every config's (cores, memory_gb)."""

    @classmethod
    def bootstrap_run(cls, run, plan_file, settings, options, *, echo):
        """Start (or resume) a run in `run`: by default the server on this machine, then the
        groups. Returns run.Started, or None when nothing was started (a dry run)."""
        from .. import run as run_ops

        return run_ops.bootstrap_here(run, plan_file, settings, options)

    @classmethod
    def stop_run(cls, run, settings, options, *, echo):
        """Stop a run: by default every group of its configs, then the server on this machine.
        Returns what is said after the run directory (`RUNDIR: stopped`), or None. Stopping
        needs no token."""
        from .. import run as run_ops

        return run_ops.stop_here(run, cls.for_run(settings, run.path, None), options)

    @staticmethod
    def worker_identity():
        """On a machine this provider made: its worker id, server, token, config and shape
        (`work/release --from-metadata`); None when the provider has no such thing."""
        return None


def names():
    return tuple(REGISTRY)


def register(name, target):
    """Add a provider: `target` is "module:class" or the class itself. Returns the previous entry."""
    previous = REGISTRY.get(name)
    REGISTRY[name] = target
    return previous


def provider_class(name):
    """The class registered under `name`, imported now."""
    target = REGISTRY.get(name)
    if target is None:
        raise SettingsError(f"provider {name!r} is not available in this version")
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(import_module(module), attribute)
    return target


def provider_for(settings, run_dir=None, token=None):
    """The provider a run's settings name, or None for `provider=none`."""
    kind = settings.get("provider", "none")
    if kind == "none":
        return None
    return provider_class(kind).for_run(settings, run_dir, token)


def check_run(settings, shapes):
    """Refuse, before anything is written, a run its provider could not serve: a shape whose
    one VM needs more vCPUs than max_vcpus, or what the provider refuses."""
    kind = settings.get("provider", "none")
    if kind == "none":
        return
    limit = settings.get("max_vcpus")
    too_big = sorted({cores for cores, _ in shapes if limit is not None and cores > limit})
    if too_big:
        raise BadInput(f"{len(too_big)} core count(s) of the plan need more vCPUs for one VM than max_vcpus"
                       f" ({limit}) allows: {', '.join(map(str, too_big[:8]))}",
                       hint="raise max_vcpus (--set max_vcpus=N), or shrink those rows in the plan")
    provider_class(kind).check_run(settings, shapes)


def refuse_flags(options, taken, phrase):
    """Refuse the flags in `options` that this run does not take: they belong to the providers
    whose own bootstrap/stop take them (`phrase` names those, e.g. "--provider {}")."""
    for owner in names():
        theirs = getattr(provider_class(owner), taken)
        if options.given(theirs):
            raise BadInput(f"{flags_text(theirs)} are for {phrase.format(owner)}")


def worker_identity():
    """This machine's identity from the first provider that knows one (`--from-metadata`)."""
    for name in names():
        identity = provider_class(name).worker_identity()
        if identity is not None:
            return identity
    raise BadInput("--from-metadata: no provider knows this machine")

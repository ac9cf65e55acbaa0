"""What a run's machines cost (DESIGN §8): a built-in, dated table of hourly prices per machine
family, spot and standard, that the `prices` setting overrides entry by entry, and the spend of
a run counted from its workers' seconds alive.

The table is Compute Engine's us-central1 list prices of custom machine types (spot prices
move monthly): a budget is a cap the run keeps, so a run in another region, or with a discount,
sets its own with `--set prices=JSON`. The family `local` prices the local provider's workers
(and workers started by hand): nothing, unless set."""

from .errors import SettingsError
from .providers.base import provider_class

PRICES_DATE = "2025-01"
PRICES = {
    "n2": {"vcpu_hour": 0.033191, "gb_hour": 0.004449, "spot_vcpu_hour": 0.00789, "spot_gb_hour": 0.00106},
    "n1": {"vcpu_hour": 0.033174, "gb_hour": 0.004446, "spot_vcpu_hour": 0.00698, "spot_gb_hour": 0.00094},
    "n2d": {"vcpu_hour": 0.028877, "gb_hour": 0.003870, "spot_vcpu_hour": 0.00564, "spot_gb_hour": 0.00076},
    "e2": {"vcpu_hour": 0.022890, "gb_hour": 0.003067, "spot_vcpu_hour": 0.00687, "spot_gb_hour": 0.00092},
    "local": {"vcpu_hour": 0.0, "gb_hour": 0.0, "spot_vcpu_hour": 0.0, "spot_gb_hour": 0.0},
}
# A VM is billed a minute at least, however short its life.
MINIMUM_SECONDS = 60.0


def price_table(overrides=None):
    """The built-in table with the `prices` setting's entries laid over it, key by key."""
    table = {family: dict(entry) for family, entry in PRICES.items()}
    for family, entry in (overrides or {}).items():
        table.setdefault(family, dict(PRICES["local"])).update(entry)
    return table


def hourly(table, family, cores, memory_gb, spot):
    """USD per hour of one machine of `family` with this shape (an unknown family costs nothing)."""
    entry = table.get(family, PRICES["local"])
    prefix = "spot_" if spot else ""
    return cores * entry[prefix + "vcpu_hour"] + memory_gb * entry[prefix + "gb_hour"]


def _provider(kind):
    """The provider class that says how its machines are billed; None for `none`, or for one
    this process has not registered (a provider added from outside, seen by the server): its
    workers are then priced as `local`."""
    if kind == "none":
        return None
    try:
        return provider_class(kind)
    except SettingsError:
        return None


def spend_usd(settings, alive_by_shape, run_seconds):
    """A run's spend so far: each (cores, memory_gb, standard, seconds alive) of its workers at
    its provider's family and provisioning model (`standard`: a group made standard after
    spot_fallback_minutes, whatever the run asks for), plus the run's own machines (the
    database VM) for `run_seconds`."""
    provider = _provider(settings.get("provider", "none"))
    table = price_table(settings.get("prices"))
    usd = 0.0
    for cores, memory_gb, standard, seconds in alive_by_shape:
        family, spot = provider.billed_as(settings, cores, memory_gb) if provider else ("local", False)
        usd += seconds / 3600 * hourly(table, family, cores, memory_gb, spot and not standard)
    for family, cores, memory_gb in (provider.run_machines if provider else ()):
        usd += max(run_seconds, 0.0) / 3600 * hourly(table, family, cores, memory_gb, False)
    return usd

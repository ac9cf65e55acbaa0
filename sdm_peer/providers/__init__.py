"""Where groups of workers come from (DESIGN §6). A provider has `create_group(config)` and
`delete_group(config)`, both idempotent, and `leave_group(config, worker_id)` (shrinking: one
worker leaves, the group's target size drops by one; a group or worker already gone is fine).
`config` is a mapping with at least the config's name (under "config" or "name") and, for
creation, `cores`, `memory_gb` and `group_size`."""

from ..errors import SettingsError


def config_name(config):
    return config.get("config") or config["name"]


def provider_for(settings, run_dir=None, token=None):
    """The provider a run's settings name, or None for `provider=none`. The gce provider needs
    the run's token (its VMs present it to the server)."""
    kind = settings.get("provider", "none")
    if kind == "none":
        return None
    if kind == "local":
        from .local import LocalProvider

        if run_dir is None:
            raise SettingsError("the local provider needs the run directory (SDM_RUN_DIR or --dir)")
        return LocalProvider(run_dir, server=settings.get("server"))
    if kind == "gce":
        from .gce import GceProvider

        if token is None:
            raise SettingsError("the gce provider needs the run's token")
        return GceProvider(settings, token)
    raise SettingsError(f"provider {kind!r} is not available in this version")


def check_run(settings, shapes):
    """Refuse, before anything is written, a run its provider could not serve: `settings` are
    the run's (stored and new), `shapes` every config's (cores, memory_gb)."""
    if settings.get("provider") == "gce":
        from .gce import check_run as check_gce_run

        check_gce_run(settings, shapes)

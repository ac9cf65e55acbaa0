"""Where groups of workers come from (DESIGN §6). A provider has `create_group(config)` and
`delete_group(config)`, both idempotent; `config` is a mapping with at least the config's name
(under "config" or "name") and, for creation, `cores`, `memory_gb` and `group_size`."""

from ..errors import SettingsError


def config_name(config):
    return config.get("config") or config["name"]


def provider_for(settings, run_dir=None):
    """The provider a run's settings name, or None for `provider=none`."""
    kind = settings.get("provider", "none")
    if kind == "none":
        return None
    if kind == "local":
        from .local import LocalProvider

        if run_dir is None:
            raise SettingsError("the local provider needs the run directory (SDM_RUN_DIR or --dir)")
        return LocalProvider(run_dir)
    raise SettingsError(f"provider {kind!r} is not available in this version")

"""Docs that cannot drift: every command has help and a README entry; named files exist."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdm_peer.cli import main
from sdm_peer.settings import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_and_a_readme_entry(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0 and main.commands[name].help
    assert f"`sdm-peer {name}" in README


def test_every_default_setting_is_documented():
    for key in DEFAULTS:
        assert f"`{key}`" in README, key


def test_files_the_readme_names_exist():
    for path in re.findall(r"`(sdm_peer/[\w/]+\.py|schema\.sql)`", README):
        assert (ROOT / path).exists() or (ROOT / "sdm_peer" / path).exists(), path

"""The README and the shipped config stay true: every option and command is documented."""

from __future__ import annotations

import re
from pathlib import Path

from typer.main import get_command

from pacs_node.cli.app import app
from pacs_node.config import NodeOptions, load_settings

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def test_every_node_option_is_in_the_readme_with_its_env_name() -> None:
    for name in NodeOptions.model_fields:
        assert f"| `{name}` | `PACS_NODE_{name.upper()}` |" in README, name


def test_shipped_node_yaml_documents_every_key_and_loads() -> None:
    text = (ROOT / "ae_config" / "node.yaml").read_text()
    for name in NodeOptions.model_fields:
        assert re.search(rf"^# {name}:", text, re.MULTILINE), name
    settings = load_settings(ROOT / "ae_config")
    assert settings.node == NodeOptions()  # the shipped file changes no default


def test_readme_commands_match_the_cli() -> None:
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    documented = set(re.findall(r"^\| `pacs-node (\w+)", README, re.MULTILINE))
    assert documented == commands


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:1200]
    assert "make run" in head
    assert "make test" in head

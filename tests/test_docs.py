"""The command reference matches the command line: every command is documented, and every
documented command exists (checked against the typer app, as `segflow --help` lists it)."""

from __future__ import annotations

import re

from conftest import REPO

from segflow.cli import app


def commands() -> set[str]:
    names = set()
    for group in [("", app)] + [(g.name, g.typer_instance) for g in app.registered_groups]:
        prefix, typer_app = group
        for command in typer_app.registered_commands:
            name = command.name or command.callback.__name__.replace("_", "-")
            names.add(f"{prefix} {name}".strip())
    return names


def test_every_command_is_in_the_reference_and_nothing_else():
    text = (REPO / "docs" / "commands.md").read_text()
    documented = set(re.findall(r"^\| `segflow ((?:data |models )?[a-z-]+)", text, flags=re.M))
    documented |= {"models"} if "| `segflow models` |" in text else set()
    assert commands() - documented == set(), "commands missing from docs/commands.md"
    assert documented - commands() - {"models"} == set(), "docs/commands.md names commands that do not exist"


def test_the_readme_links_resolve():
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "CONTRIBUTING.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"

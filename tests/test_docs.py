"""The command reference matches the command line: every command is documented, and every
documented command exists (checked against the typer app, as `segflow --help` lists it)."""

from __future__ import annotations

import re

from conftest import REPO

from segflow_kfp.cli import app


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


def test_every_stage_has_one_name_everywhere():
    """The README's stage table: each stage N is the function ``segflow.stages.N_stage``, the command
    ``segflow N`` (``-`` for ``_``; import and convert sit in the data and models groups), the
    MLflow stage tag N, the launch key N where it trains, and a component named N or N_<what>."""
    import inspect

    from kfp.dsl.base_component import BaseComponent

    import segflow_kfp
    from segflow import launch, stages

    text = (REPO / "README.md").read_text()
    rows = re.findall(
        r"^\| [^|]+ \| `(\w+)` \| (?:`segflow ([a-z -]+)`) \| (?:`(\w+)`|\(not in a pipeline\)) \|$", text, re.M
    )
    assert len(rows) >= 13, rows
    components = {
        name
        for module in (REPO / "segflow_kfp").glob("*.py")
        for name, value in vars(__import__(f"segflow_kfp.{module.stem}", fromlist=["_"])).items()
        if isinstance(value, BaseComponent)
    }
    assert segflow_kfp and {"train_model", "check_data"} <= components
    for function, command, component in rows:
        name = command.split()[-1].replace("-", "_")
        assert function == f"{name}_stage", (function, command)
        assert command in commands(), command
        source = inspect.getsource(getattr(stages, function))
        if "stage_log(" in source:
            assert f'stage_log("{name}"' in source, f"{function} tracks under another tag"
        if component:
            assert component in components and (component == name or component.startswith(f"{name}_")), component
    assert set(launch._stages()) <= {command.split()[-1].replace("-", "_") for _, command, _ in rows}

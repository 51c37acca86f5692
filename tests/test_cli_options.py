"""Every command's options reach its stage's typed config: none is silently dropped."""

from __future__ import annotations

import pytest
from conftest import run_cli

from segflow.adapt.config import AdaptConfig
from segflow.cli import from_options


def test_an_option_without_a_field_is_refused():
    options = {"source": "s", "target": "t", "init": "i", "out": "o", "method": "dacs", "track": True}
    assert from_options(AdaptConfig, options).method == "dacs"
    with pytest.raises(TypeError, match=r"AdaptConfig has no field for the option\(s\) ent_wieght"):
        from_options(AdaptConfig, options | {"ent_wieght": 2.0})


@pytest.mark.parametrize(
    "args",
    [
        ["data", "import", "{missing}", "{tmp}/ds", "--no-track"],
        ["train", "--data", "{missing}", "--out", "{tmp}/m", "--no-track"],
        ["pretrain", "--images", "{missing}", "--out", "{tmp}/b", "--no-track"],
        [
            "adapt",
            "--source",
            "{missing}",
            "--target",
            "{missing}",
            "--init",
            "{missing}",
            "--out",
            "{tmp}/a",
            "--method",
            "dacs",
            "--no-track",
        ],
        ["evaluate", "--model", "{missing}", "--data", "{missing}", "--out", "{tmp}/e", "--no-track"],
        ["export", "--model", "{missing}", "--out", "{tmp}/ir", "--no-track"],
        ["predict", "--model", "{missing}", "--input", "{missing}", "--out", "{tmp}/p"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_every_command_builds_its_config(args, tmp_path):
    """Each command gets as far as its stage (a missing input: exit 2 with a message), so every
    option it declares has a place in the config or is used by the command itself."""
    missing = tmp_path / "missing"
    code, _, err = run_cli(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert code == 2 and "missing" in err and "Traceback" not in err, err

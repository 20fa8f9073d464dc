"""Fixtures the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmspec.cli import app


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """The synthetic shapes data from the CLI (`vlm data synth`): 64 training samples of 48 px, 8 held out."""
    out = tmp_path_factory.mktemp("synth") / "shapes"
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(out), "--n", "64", "--test", "8", "--size", "48"])
    assert r.exit_code == 0, r.output
    return out

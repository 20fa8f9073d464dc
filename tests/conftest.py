import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec to a temp file and return its path."""

    def write(text: str, name: str = "spec.vlm") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    return write


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """The synthetic shapes data from the CLI (`vlm data synth`): 64 training samples of 48 px, 8 held out."""
    from vlmspec.cli import app

    out = tmp_path_factory.mktemp("synth") / "shapes"
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(out), "--n", "64", "--test", "8", "--size", "48"])
    assert r.exit_code == 0, r.output
    return out

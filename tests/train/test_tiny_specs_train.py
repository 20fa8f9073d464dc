"""The any-resolution and tiled tiny specs train every stage of their schedule on the synthetic data from the CLI
(`vlm data synth -> vlm train --steps 2`), their images laid out as tiles in the training batches, and the
trained folder answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
SPECS = ["llava-v1.6-mistral-7b.vlm:llava_v1_6_mistral_7b_tiny", "llava-onevision-qwen2-7b.vlm:llava_onevision_qwen2_7b_tiny",
         "internvl2.5-8b.vlm:internvl2_5_8b_tiny"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(out), "--n", "64", "--test", "8", "--size", "48"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("spec", SPECS, ids=[s.split(":")[1] for s in SPECS])
def test_tiny_spec_trains_its_stages(spec: str, data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["train", f"{ROOT}/specs/{spec}", "--data", str(data), "-o", str(tmp_path / "run"),
                            "--steps", "2"])
    assert r.exit_code == 0, r.output
    from vlmspec.compiler.compile import load_analysis

    stages = [s.name for s in load_analysis(f"{ROOT}/specs/{spec}")[0].ir.stages]
    for stage in stages:
        assert stage in r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "run" / "final"), "--image", str(next(data.rglob("*.png"))),
                            "--prompt", "What colour is the shape?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output

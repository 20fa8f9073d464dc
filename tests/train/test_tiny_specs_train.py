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
         "internvl2.5-8b.vlm:internvl2_5_8b_tiny", "minigpt-v2-7b.vlm:minigpt_v2_7b_tiny",
         "fuyu-8b.vlm:fuyu_8b_tiny", "cobra-3b.vlm:cobra_3b_tiny", "convllava-7b.vlm:convllava_7b_tiny",
         "pixtral-12b.vlm:pixtral_12b_tiny", "deepseek-vl-7b.vlm:deepseek_vl_7b_tiny",
         "kosmos-2.vlm:kosmos_2_tiny"]


@pytest.fixture(scope="module")
def data(shapes: Path) -> Path:
    return shapes


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


@pytest.mark.parametrize("spec", ["qwen2-vl-2b.vlm:qwen2_vl_2b_tiny", "qwen2.5-vl-7b.vlm:qwen2_5_vl_7b_tiny"])
def test_native_resolution_trains_on_mixed_sizes(spec: str, tmp_path: Path) -> None:
    """A Qwen2-VL / Qwen2.5-VL stage on images of several sizes: each read at its processor size (its own
    token count and M-RoPE grid), rows of different sizes in one batch."""
    import json

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, (w, h) in enumerate([(32, 32), (48, 16), (16, 48), (40, 24)] * 2):
        Image.new("RGB", (w, h), (40 * i % 255, 120, 200)).save(images / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    r = CliRunner().invoke(app, ["train", f"{ROOT}/specs/{spec}", "--data", str(tmp_path / "train.json"),
                                 "-o", str(tmp_path / "run"), "--steps", "2", "--stage", "instruct"])
    assert r.exit_code == 0, r.output

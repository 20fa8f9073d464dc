"""`vlm train --dry-run --data ...` counts each sample's image tokens from the images' headers, for models whose
count follows the image's size (dynamic tiles, any resolution, native resolution); the range it prints equals
what the processor's transforms give the same images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(32, 32), (90, 40), (16, 48), (40, 24), (120, 30)]  # (width, height)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    records = []
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (30 * i, 120, 200)).save(root / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


@pytest.mark.parametrize(("spec", "stage"), [("internvl2.5-8b.vlm:internvl2_5_8b_tiny", "instruct"),
                                           ("qwen2-vl-2b.vlm:qwen2_vl_2b_tiny", "instruct"),
                                           ("llava-onevision-qwen2-7b.vlm:llava_onevision_qwen2_7b_tiny", "onevision"),
                                           ("llava-1.5-7b.vlm:llava_1_5_7b_tiny", "instruct")])
def test_dry_run_counts_image_tokens_as_the_processor_does(spec: str, stage: str, data: Path, tmp_path: Path) -> None:
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor
    from vlmspec.runtime.inputs.tokenizer import byte_tokenizer, ensure_special_tokens

    analysis, _ = load_analysis(f"{ROOT}/specs/{spec}")
    # the stage's own `data "train.json"` is relative to the --data folder; a stage without one reads --data
    own = next(s for s in analysis.ir.stages if s.name == stage).data is not None
    r = CliRunner().invoke(app, ["train", f"{ROOT}/specs/{spec}", "--data", str(data.parent if own else data), "-o",
                                 str(tmp_path / "run"), "--dry-run", "--stage", stage])
    assert r.exit_code == 0, r.output
    found = re.search(r"data: 5 samples; image tokens per sample (\d+)\.\.(\d+)", r.output)
    assert found, r.output
    proc = Processor(analysis, ensure_special_tokens(byte_tokenizer(), analysis))
    counts = [proc.image_tokens(proc.image_transform(data.parent / "images" / f"{i}.png")) for i in range(len(SIZES))]
    assert (int(found.group(1)), int(found.group(2))) == (min(counts), max(counts))
    if "llava_1_5" not in spec:
        assert min(counts) < max(counts)  # the count follows the size

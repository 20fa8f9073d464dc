"""The tiny Qwen2-VL's stages on `vlm data synth --video` (moving shapes), scored by `vlm eval --task video_qa` on
the held-out multiple-choice file: direction accuracy well above chance (25%). Slow (about 1.5 minutes on 2 CPUs).

Known gap (see the helper's report): with these settings the tiny spec stays at chance on direction, while the
same pipeline learns a video's colour; the marker comes off when the tiny spec learns motion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLM = [sys.executable, "-m", "vlmspec.cli"]

#: the tiny spec's own three stages, with learning rates and lengths a CPU run learns in
SPEC = f"""import "{ROOT}/specs/qwen2-vl-2b.vlm"

model moving_shapes extends qwen2_vl_2b_tiny {{
  stage vit_pretrain {{ train vit, merger  freeze llm  optim adamw(lr = 2e-3)  batch 16  steps 200 }}
  stage full_pretrain {{ train vit, merger, llm  optim adamw(lr = 2e-3)  batch 16  steps 800 }}
  stage instruct {{ train llm  freeze vit, merger  optim adamw(lr = 1e-3)  batch 16  steps 200 }}
}}
"""


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the tiny Qwen2-VL does not yet learn motion direction on CPU (stays at 25%)")
def test_tiny_qwen2_vl_learns_which_way_the_shape_moves(tmp_path) -> None:
    data = tmp_path / "moving"
    subprocess.run([*VLM, "data", "synth", "--video", "-o", str(data), "--n", "1600", "--test", "80"], check=True)
    spec = tmp_path / "moving.vlm"
    spec.write_text(SPEC)
    subprocess.run([*VLM, "train", str(spec), "--data", str(data / "train_video.json"), "-o", str(tmp_path / "run"),
                    "--workers", "0"], check=True)
    subprocess.run([*VLM, "eval", str(tmp_path / "run" / "final"), "--task", "video_qa", "--data",
                    str(data / "test_video_qa.jsonl"), "-o", str(tmp_path / "eval.json")], check=True)
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    print("held-out video_qa:", metrics)
    assert metrics["questions"] == 80 and metrics["unmatched"] <= 8
    assert metrics["video_qa_accuracy"] >= 60  # chance is 25% (four directions, 20 each)

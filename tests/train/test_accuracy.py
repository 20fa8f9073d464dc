"""The README demo's promise: the tiny LLaVA's two stages take held-out accuracy from chance to >= 90%."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLM = [sys.executable, "-m", "vlmspec.cli"]


@pytest.mark.slow
def test_tiny_llava_learns_to_see(tmp_path) -> None:
    data = tmp_path / "shapes"
    subprocess.run([*VLM, "data", "synth", "-o", str(data), "--n", "4000", "--test", "200", "--size", "64"], check=True)
    subprocess.run([*VLM, "train", f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny", "--data", str(data),
                    "-o", str(tmp_path / "run"), "--eval", str(data / "test_vqa.jsonl"), "--eval-every", "250"],
                   check=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["stage"], r["step"], r["vqa_accuracy"]) for r in rows if r.get("eval") == "vqa"]
    print("held-out accuracy curve:", curve)
    assert curve[0][2] < 50  # near chance after the align stage (6 colours, 4 shapes)
    assert curve[-1][2] >= 90
    subprocess.run([*VLM, "eval", str(tmp_path / "run" / "final"), "--task", "vqa", "--data",
                        str(data / "test_vqa.jsonl"), "-o", str(tmp_path / "eval.json")],
                       check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["metrics"]["vqa_accuracy"] == curve[-1][2]  # same number, same data, same code

"""Ordinary commands print what vlmspec says, not the libraries' import noise (torchao's CUDA kernels that
a CPU machine cannot load, torch pytree deprecations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.model import build_model
from vlmspec.compiler.schema.stage import LoraSpec
from vlmspec.runtime.train.lora import inject_lora
a = load_analysis("specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")[0]
stage = a.ir.stages[0].model_copy(update={"lora": [LoraSpec(path="llm", rank=2)]})
print(len(inject_lora(build_model(a), a, stage)))
"""


def test_a_lora_stage_imports_peft_quietly() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) > 0
    assert "Failed to load" not in r.stderr and "_pytree" not in r.stderr, r.stderr[-2000:]

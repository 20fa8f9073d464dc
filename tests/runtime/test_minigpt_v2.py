"""MiniGPT-v2's connector: every 4 consecutive visual tokens concatenated into one (`linear { group = 4 }`), then
one projection, as its `encode_img` views [b x 1024 x 1408] as [b x 256 x 5632]; a group that does not divide
the token count is refused where it is written."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmspec.compiler.compile import check_file, load_analysis
from vlmspec.runtime.model import build_model

SPEC = Path(__file__).resolve().parents[2] / "specs" / "minigpt-v2-7b.vlm"


def test_consecutive_tokens_are_concatenated_then_projected() -> None:
    analysis, _ = load_analysis(f"{SPEC}:minigpt_v2_7b_tiny")
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.components["eva"](px).x  # [2 x 16 x 32]: the class token dropped, after ln_vision
        # token j of the connector's input is tokens 4j .. 4j+3 side by side (written independently of a view)
        grouped = torch.cat([x[:, k::4] for k in range(4)], dim=-1)
        want = model.components["proj"].linear(grouped)
        got = model.encode_images(px)["prefix"]
    assert x.shape == (2, 16, 32) and got.shape == (2, 4, 48)
    assert torch.allclose(got, want, atol=1e-6)
    assert analysis.shapes.out["proj"].tokens == 4


def test_a_group_that_does_not_divide_the_tokens_is_refused() -> None:
    text = SPEC.read_text().replace("group = 4  #", "group = 3  #")
    result = check_file("minigpt.vlm", None, text=text)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert errors and errors[0].code == "E0205" and "not divisible by group = 3" in errors[0].message
    assert errors[0].span is not None and text.splitlines()[errors[0].span.line - 1].strip().startswith("group = 3")

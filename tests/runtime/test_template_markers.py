"""A spec that names no tokenizer reads its templates' turn markers (`<|im_start|>`, `<|im_end|>`) as one token
each, as the checkpoint's tokenizer would: the answer's closing marker is one token to learn, and a decoded
answer never shows a marker cut in half (the tiny Qwen2-VL once printed `low<|im_`)."""

from __future__ import annotations

from pathlib import Path

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.session import build_session, template_markers

ROOT = Path(__file__).resolve().parents[2]
QWEN = f"{ROOT}/specs/qwen2-vl-2b.vlm:qwen2_vl_2b_tiny"


def test_markers_are_read_from_the_templates_in_order() -> None:
    analysis = load_analysis(QWEN)[0]
    assert template_markers(analysis) == ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"]
    llava = load_analysis(f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")[0]
    assert template_markers(llava) == []  # `USER:` / `ASSISTANT:` are words, not markers


def test_the_built_in_tokenizer_keeps_each_marker_whole() -> None:
    session = build_session(load_analysis(QWEN)[0], device="meta")
    tok = session.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [end]
    ids = tok("low<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [*tok("low", add_special_tokens=False)["input_ids"], end]
    assert tok.decode(ids, skip_special_tokens=True) == "low"
    # the image placeholder kept its place among the specials (markers come after it)
    assert tok.convert_tokens_to_ids("<image>") < end

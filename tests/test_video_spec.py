"""`video = frames(...)` on the spec side: what `vlm summary` counts, a resolved spec that reads the same, the
model and reader it builds, and a model without it refusing videos (no PyAV or transformers needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diag_cases import VIDEO_MERGER, VIDEO_VIT, spec  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402

MROPE_LLM = ("  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  max_positions = 256  "
             "rope = mrope(sections = [2, 2, 2]) }\n")


def _analysis(tmp_path: Path, frames: str, **parts: str):
    path = tmp_path / "m.vlm"
    path.write_text(spec(vision=VIDEO_VIT.format(frames), connector=VIDEO_MERGER, **parts))
    analysis, _ = load_analysis(str(path))
    return analysis


def test_summary_counts_tokens_per_video(tmp_path):
    """Fewest: one temporal patch at min_pixels (1024 px = 4 merged 16-px tokens); most: max_frames / 2
    patches at max_pixels (16 tokens each), capped by max_tokens."""
    from vlmspec.compiler.summary import summarise

    got = summarise(_analysis(tmp_path, "max_frames = 8, max_tokens = 200"))["video_tokens"]
    assert got == {"clip": {"min": 4, "max": 64, "min_pixels": 1024, "max_pixels": 4096}}
    got = summarise(_analysis(tmp_path, "max_frames = 64, max_tokens = 200"))["video_tokens"]
    assert got["clip"]["max"] == 200


def test_resolved_spec_reads_the_same(tmp_path):
    """`to_vlm` (what `vlm show --resolved` prints) writes every value in force, and reads back to the same
    settings; `fps` is left out beside `num_frames` (the two together are E0271)."""
    for frames in ("max_tokens = 64", "num_frames = 8, max_tokens = 64, token_id = 7, tokens_per_second = 2"):
        cfg = _analysis(tmp_path, frames, language=MROPE_LLM).ir.components["clip"].config.video
        text = cfg.to_vlm()
        assert ("fps" in text) == (cfg.num_frames is None)
        again = _analysis(tmp_path, text[len("frames("):-1], language=MROPE_LLM).ir.components["clip"].config.video
        assert again.model_dump() == cfg.model_dump()


def test_built_model_reads_videos(tmp_path):
    """The token id and absolute time reach the model; a video's features are its patches' tokens, and the
    prompt's video placeholders take them (logits move with the frames)."""
    from vlmspec.runtime.decoding import VIDEO_GRID, VIDEO_TIME
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.video_features import video_reader

    analysis = _analysis(tmp_path, "max_tokens = 64, token_id = 7, tokens_per_second = 2", language=MROPE_LLM)
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    assert model.video_token_id == 7 and video_reader(analysis).rule.factor == 16
    frames = torch.randn(1, 4, 3, 32, 48)
    with torch.no_grad():
        feats = model.encode_videos(frames, torch.tensor([0.75]))
        assert feats["prefix"].shape == (1, 2 * 2 * 3, 48)
        assert feats[VIDEO_GRID].tolist() == [[2, 2, 3]] and feats[VIDEO_TIME].tolist() == [1.5]
        ids = torch.tensor([[1, 2, *[7] * 12, 3, 4]])
        a = model(ids, image_features=feats).logits
        b = model(ids, image_features=model.encode_videos(frames.flip(1), torch.tensor([0.75]))).logits
        assert (a - b).abs().max() > 1e-4
        with pytest.raises(UserInputError) as err:
            model.encode_videos(torch.randn(1, 3, 3, 32, 48))  # not whole temporal patches
    assert err.value.diagnostics[0].code == "E0604"


def test_a_model_without_frames_refuses_videos(tmp_path):
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.video_features import video_reader

    path = tmp_path / "m.vlm"
    path.write_text(spec())
    analysis, _ = load_analysis(str(path))
    for call in (lambda: video_reader(analysis), lambda: build_model(analysis).encode_videos(torch.zeros(1, 2, 3, 32, 32))):
        with pytest.raises(UserInputError) as err:
            call()
        assert err.value.diagnostics[0].code == "E0604"

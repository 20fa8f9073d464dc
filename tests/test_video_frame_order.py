"""What a video model must see to tell which way something moves, checked on the tiny Qwen2-VL: each temporal patch
is two consecutive frames in order (swapping a patch's frames changes that patch's tokens and only those; a
patch's tokens are the pair's own), M-RoPE gives each temporal patch its own time id, and the synthetic clips
move their shape far enough per frame, in the labelled direction, to show inside one temporal patch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/specs/qwen2-vl-2b.vlm:qwen2_vl_2b_tiny"


@pytest.fixture(scope="module")
def model():
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.session import build_session

    analysis, _ = load_analysis(TINY)
    return build_session(analysis, seed=0).model.eval()


def _tokens(model, frames: torch.Tensor) -> torch.Tensor:
    """[F x c x h x w] -> the video's tokens [temporal patches x 4 x d] (2 x 2 merged tokens a patch)."""
    (fusion,) = model.in_sequence
    with torch.no_grad():
        x = model.encode_videos(frames[None])[fusion][0]
    return x.reshape(frames.shape[0] // 2, 4, -1)


def test_each_temporal_patch_is_two_consecutive_frames_in_order(model):
    frames = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = _tokens(model, frames)
    # a patch's tokens are those of its own two frames, read alone
    for k in range(4):
        assert torch.allclose(base[k], _tokens(model, frames[2 * k:2 * k + 2])[0], atol=1e-6)
    # swapping the two frames of patch 0 changes patch 0 (the 3-D patch embedding sees their order), nothing else
    swapped = _tokens(model, frames[[1, 0, 2, 3, 4, 5, 6, 7]])
    assert (swapped[0] - base[0]).abs().max() > 1e-3
    assert torch.equal(swapped[1:], base[1:])
    # swapping frames 1 and 2 (across patches) changes patches 0 and 1
    across = _tokens(model, frames[[0, 2, 1, 3, 4, 5, 6, 7]])
    assert all((across[k] - base[k]).abs().max() > 1e-3 for k in (0, 1)) and torch.equal(across[2:], base[2:])


def test_time_ids_advance_per_temporal_patch():
    from vlmspec.runtime.language.mrope import video_mrope_positions

    ids = torch.tensor([[7, 8] + [5] * 16 + [9, 9]])
    pos, _ = video_mrope_positions(ids, None, 5, [(4, 2, 2)], torch.ones(1))
    video = pos[:, 0, 2:18]
    assert video[0].tolist() == [2 + t for t in range(4) for _ in range(4)]  # time: one id per patch
    assert video[1].tolist() == [2, 2, 3, 3] * 4 and video[2].tolist() == [2, 3, 2, 3] * 4
    assert pos[:, 0, 18].tolist() == [4, 4, 4]  # the text after resumes past the rows and columns


def test_synthetic_clips_move_far_enough_per_frame(tmp_path):
    """Every clip's shape moves 2+ px a frame along its label (32-px frames, 8 frames), and nowhere else."""
    import json

    import numpy as np
    from PIL import Image

    from vlmspec.runtime.inputs.synth import BACKGROUNDS, DIRECTIONS, synthesize_video

    synthesize_video(tmp_path, n_train=0, n_test=8)
    for line in (tmp_path / "test_video_qa.jsonl").read_text().splitlines():
        q = json.loads(line)
        centres = []
        for f in sorted((tmp_path / q["video"]).glob("*.png")):
            px = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64)
            lit = np.abs(px - BACKGROUNDS["black"]).sum(-1) > 30  # the shape: what is not the background
            ys, xs = np.nonzero(lit)
            centres.append((xs.mean(), ys.mean()))
        step = np.diff(np.array(centres), axis=0)  # [7 x (dx, dy)]
        dx, dy = DIRECTIONS[q["answer"]]
        along = step @ np.array([dx, dy], dtype=np.float64)
        across = step @ np.array([dy, dx], dtype=np.float64)
        assert along.min() >= 2.0 and np.abs(across).max() < 0.5, (q["answer"], step)

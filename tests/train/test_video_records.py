"""Training on `"video"` records: `vlm data synth --video` -> `vlm train` of the tiny Qwen2-VL, whose micro-batches
carry the sampled frames (the model's forward encodes them as a video, not as stills), with a finite loss; and
the micro-batches one forward cannot take refused with their own errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/specs/qwen2-vl-2b.vlm:qwen2_vl_2b_tiny"


def _vlm(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def moving(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "moving"
    _vlm("data", "synth", "--video", "-o", str(out), "--n", "8", "--test", "4")
    return out


def test_synth_writes_videos_and_records(moving):
    train = json.loads((moving / "train_video.json").read_text())
    assert len(train) == 8 and all(r["video"].startswith("videos/") for r in train)
    assert train[0]["conversations"][0]["value"].startswith("<video>\nWhich way does the shape move?")
    assert {r["conversations"][1]["value"] for r in train} <= {"left", "right", "up", "down"}
    assert len(list((moving / train[0]["video"]).glob("*.png"))) == 8
    qa = [json.loads(x) for x in (moving / "test_video_qa.jsonl").read_text().splitlines()]
    assert [q["answer"] for q in qa] == ["left", "right", "up", "down"]


def test_synth_mp4_decodes_to_its_frames(tmp_path):
    """An MPEG-4 clip reads back as the frames drawn (8 frames at 2 fps, all kept), close in colour."""
    pytest.importorskip("av")
    import numpy as np

    from vlmspec.runtime.inputs.synth import synthesize_video
    from vlmspec.runtime.inputs.video import SamplingRule, _decode_file

    synthesize_video(tmp_path, n_train=1, n_test=0, fmt="mp4")
    rule = SamplingRule(2.0, None, 4, 8, 256, 1024, 2, 16)
    frames, indices, total, rate = _decode_file(tmp_path / "videos" / "000000.mp4", rule)
    assert (total, rate, indices) == (8, 2.0, list(range(8)))
    drawn = [torch.from_numpy(np.asarray(f, dtype=np.float32)) for f in frames]
    assert all(d.shape == (32, 32, 3) for d in drawn)
    # the shape moves: consecutive frames differ, and the first and last differ most
    diffs = [float((drawn[i + 1] - drawn[i]).abs().mean()) for i in range(7)]
    assert min(diffs) > 0.5 and float((drawn[-1] - drawn[0]).abs().mean()) > max(diffs)


def test_tiny_qwen2_vl_trains_on_video_records(moving, tmp_path, monkeypatch):
    """2 steps from the CLI; every training forward gets `videos` [b x 8 x 3 x 32 x 32] (8 sampled frames, not
    a still repeated), its prompt holds the 16 video tokens, and the loss is finite."""
    from vlmspec.runtime.model import VisionLanguageModel

    seen: list[dict] = []
    forward = VisionLanguageModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append({k: v for k, v in kwargs.items() if k in ("videos", "pixel_values", "input_ids")})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "forward", spy)
    run = tmp_path / "run"
    _vlm("train", TINY, "--data", str(moving / "train_video.json"), "-o", str(run), "--steps", "2",
         "--stage", "instruct", "--workers", "0")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert seen
    from vlmspec.runtime.inputs.tokenizer import load_tokenizer

    image_token = load_tokenizer(run / "tokenizer").convert_tokens_to_ids("<|image_pad|>")
    for kw in seen:
        videos = kw["videos"]
        assert kw.get("pixel_values") is None and videos.shape[1:] == (8, 3, 32, 32)
        assert not torch.equal(videos[:, 0], videos[:, 1])  # consecutive frames differ: a video, not a still
        assert ((kw["input_ids"] == image_token).sum(1) == 16).all()  # 4 temporal patches x 2 x 2 merged tokens


def test_mixed_micro_batch_is_refused(moving, tmp_path):
    """A micro-batch of a video and a still: E0605, before any step."""
    from vlmspec.diagnostics import VlmSpecError
    from vlmspec.runtime.inputs.video import Video
    from vlmspec.runtime.train.video_items import is_video_batch, video_batch

    clip = Video(torch.zeros(8, 3, 32, 32), list(range(8)), 2.0, (4, 2, 2))
    assert is_video_batch([clip, clip], "s") and not is_video_batch([torch.zeros(3, 32, 32)], "s")
    with pytest.raises(VlmSpecError) as e:
        is_video_batch([clip, torch.zeros(3, 32, 32)], "s")
    assert e.value.diagnostics[0].code == "E0605"
    other = Video(torch.zeros(4, 3, 32, 32), list(range(4)), 2.0, (2, 2, 2))
    with pytest.raises(VlmSpecError) as e:
        video_batch([clip, other], 2, "s")
    assert e.value.diagnostics[0].code == "E0606"
    batch = video_batch([clip, clip], 2, "s")
    assert batch["videos"].shape == (2, 8, 3, 32, 32) and batch["video_seconds"].tolist() == [1.0, 1.0]


def test_tiny_onevision_trains_on_pooled_video_frames(tmp_path, monkeypatch):
    """LLaVA-OneVision reads a video as `num_frames` stills, each pooled 2 x 2: 2 steps from the CLI with the
    tiny spec's `frames(num_frames = 4, pool = 2)`; every forward gets the 4 sampled frames (not 8, not a still),
    its prompt holds 4 x (2 x 2) pooled tokens + one newline, and the loss is finite; the trained model then
    answers `vlm eval --task video_qa`."""
    from vlmspec.runtime.model import VisionLanguageModel

    seen: list[dict] = []
    forward = VisionLanguageModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append({k: v for k, v in kwargs.items() if k in ("videos", "pixel_values", "input_ids")})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "forward", spy)
    data = tmp_path / "data"  # the spec's stages name captions.jsonl and train.json: the video records are the latter
    _vlm("data", "synth", "-o", str(data), "--n", "8", "--test", "4")
    _vlm("data", "synth", "--video", "-o", str(data), "--n", "8", "--test", "4")
    (data / "train.json").write_text((data / "train_video.json").read_text())
    run = tmp_path / "run"
    spec = f"{ROOT}/specs/llava-onevision-qwen2-7b.vlm:llava_onevision_qwen2_7b_tiny"
    _vlm("train", spec, "--data", str(data), "-o", str(run), "--steps", "2", "--stage", "onevision", "--workers", "0")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    from vlmspec.runtime.inputs.tokenizer import load_tokenizer

    image_token = load_tokenizer(run / "tokenizer").convert_tokens_to_ids("<image>")
    assert seen
    for kw in seen:
        videos = kw["videos"]
        assert kw.get("pixel_values") is None and videos.shape[1:] == (4, 3, 32, 32)
        assert not torch.equal(videos[:, 0], videos[:, 1])
        assert ((kw["input_ids"] == image_token).sum(1) == 4 * 4 + 1).all()
    out = _vlm("eval", str(run / "final"), "--task", "video_qa", "--data", str(data / "test_video_qa.jsonl"))
    assert "video_qa_accuracy" in out and "questions 4" in out


def test_train_eval_scores_held_out_video_qa(moving, tmp_path):
    """`vlm train --eval test_video_qa.jsonl` scores the held-out videos with `vlm eval --task video_qa`'s code at
    the end of the stage (the file's records name videos), logged and in metrics.jsonl."""
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", TINY, "--data", str(moving / "train_video.json"), "-o", str(run), "--steps",
                                 "1", "--stage", "instruct", "--workers", "0", "--eval",
                                 str(moving / "test_video_qa.jsonl")])
    assert r.exit_code == 0, r.output
    assert "held-out video QA accuracy" in r.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [x for x in rows if x.get("eval") == "video_qa"]
    assert len(scored) == 1 and scored[0]["questions"] == 4 and 0.0 <= scored[0]["video_qa_accuracy"] <= 100.0

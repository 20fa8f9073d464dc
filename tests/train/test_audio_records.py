"""Training on `"audio"` records: `vlm data synth --audio` -> `vlm train` of the tiny Qwen2-Audio, whose micro-batches
carry each clip's log-mel features at the spec's front end (the numbers `vlm generate --audio` reads), with one
placeholder per audio token in the prompt; what one forward cannot take, or a model cannot read, is refused with
its own error; and the tiny spec's published two stages learn the tones' pitch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/specs/qwen2-audio-7b.vlm:qwen2_audio_7b_tiny"


def _vlm(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _fails(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 1, r.output
    return r.output


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tones"
    _vlm("data", "synth", "--audio", "-o", str(out), "--n", "12", "--test", "6")
    return out


def test_synth_writes_clips_and_records(tones):
    from vlmspec.runtime.inputs.audio import read_wav

    train = json.loads((tones / "train_audio.json").read_text())
    assert len(train) == 12 and all(r["audio"].startswith("audio/") for r in train)
    assert train[0]["conversations"][0]["value"].startswith("<audio>\nIs the tone low, middle or high?")
    test = json.loads((tones / "test_audio.json").read_text())
    assert [r["conversations"][1]["value"] for r in test] == ["low", "middle", "high"] * 2
    clip = read_wav(tones / train[0]["audio"])
    assert clip.rate == 16000 and 8000 <= len(clip.samples) <= 16000


def test_tiny_qwen2_audio_trains_on_audio_records(tones, tmp_path, monkeypatch):
    """2 steps from the CLI; every training forward gets `audio` [b x 16 mels x 100 frames] with each clip's real
    frame count, its prompt holds as many `<|AUDIO|>` tokens as the clip gives audio tokens (what `vlm generate
    --audio` writes for it), and the loss is finite."""
    from vlmspec.runtime.audio.encoder import audio_token_count
    from vlmspec.runtime.model import VisionLanguageModel

    seen: list[dict] = []
    forward = VisionLanguageModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append({k: v for k, v in kwargs.items() if k in ("audio", "audio_lengths", "input_ids",
                                                                  "pixel_values")})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "forward", spy)
    run = tmp_path / "run"
    out = CliRunner().invoke(app, ["train", TINY, "--data", str(tones), "-o", str(run),
                                   "--steps", "2", "--stage", "instruct", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert "--audio" in out.output  # the closing hint names the input the model reads
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    from vlmspec.runtime.inputs.tokenizer import load_tokenizer

    audio_token = load_tokenizer(run / "tokenizer").convert_tokens_to_ids("<|AUDIO|>")
    assert seen
    for kw in seen:
        assert kw.get("pixel_values") is None and kw["audio"].shape[1:] == (16, 100)
        lengths = kw["audio_lengths"]
        assert ((lengths >= 50) & (lengths <= 100)).all() and len(set(lengths.tolist())) > 1  # clips of 0.5-1 s
        want = audio_token_count(lengths, 2)
        assert torch.equal((kw["input_ids"] == audio_token).sum(1), want)


def test_image_records_to_an_audio_model_are_refused(tmp_path):
    """Dropping the pictures would train the audio model on text alone: E0543, before any step."""
    data = tmp_path / "d"
    _vlm("data", "synth", "-o", str(data), "--n", "4", "--test", "2")
    (data / "train_audio.json").write_text((data / "train.json").read_text())  # the stage's file holds images
    out = _fails("train", TINY, "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "1",
                 "--stage", "instruct", "--workers", "0")
    assert "E0543" in out and "reads audio" in out


def test_audio_records_to_a_vision_model_are_refused(tones, tmp_path):
    """A LLaVA has no audio encoder: training it on clips would train on the questions alone. E0548."""
    import shutil

    data = tmp_path / "d"  # the spec's stages read captions.jsonl and train.json: the clips are the latter
    _vlm("data", "synth", "-o", str(data), "--n", "4", "--test", "2")
    shutil.copytree(tones / "audio", data / "audio")
    shutil.copy(tones / "train_audio.json", data / "train.json")
    out = _fails("train", f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny", "--data", str(data),
                 "-o", str(tmp_path / "run"), "--steps", "1", "--stage", "instruct", "--workers", "0")
    assert "E0548" in out and "no audio encoder" in out


def test_mixed_and_packed_audio_batches_are_refused():
    from types import SimpleNamespace

    from vlmspec.diagnostics import VlmSpecError
    from vlmspec.runtime.train.audio_items import AudioItem, audio_training_batch, is_audio_batch

    clip = AudioItem(torch.zeros(16, 100), 80, 20)
    assert is_audio_batch([clip, clip], "s") and not is_audio_batch([None], "s")
    with pytest.raises(VlmSpecError) as e:
        is_audio_batch([clip, None], "s")
    assert e.value.diagnostics[0].code == "E0545"
    with pytest.raises(VlmSpecError) as e:
        audio_training_batch(None, [], [clip], SimpleNamespace(packs=True, name="s"))
    assert e.value.diagnostics[0].code == "E0547"


def test_tiny_qwen2_audio_learns_the_pitch(tmp_path):
    """The tiny spec's two published stages (encoder + projector under a frozen language model, then projector +
    language model) on 400 synthetic tones; held-out: 60 clips, 20 per pitch, chance 1/3. Measured 100% (60/60)
    in about 12 s of training on 2 cores; asserted at >= 80%."""
    from vlmspec.evaluation.video_qa import match_option
    from vlmspec.runtime.audio.answer import answer_audio
    from vlmspec.runtime.session import load_session

    data = tmp_path / "d"
    _vlm("data", "synth", "--audio", "-o", str(data), "--n", "400", "--test", "60")
    _vlm("train", TINY, "--data", str(data), "-o", str(tmp_path / "run"), "--workers", "0")
    session = load_session(tmp_path / "run" / "final")
    options = ["low", "middle", "high"]
    right = 0
    for rec in json.loads((data / "test_audio.json").read_text()):
        question = rec["conversations"][0]["value"].removeprefix("<audio>\n")
        said = answer_audio(session, question, data / rec["audio"], max_new_tokens=4)
        picked = match_option(said, options)
        right += picked is not None and options[picked] == rec["conversations"][1]["value"]
    assert right / 60 >= 0.8, f"held-out pitch accuracy {right}/60"

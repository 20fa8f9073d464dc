"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): a tiny Whisper-style encoder (16 mels, 1 s clips) with
its stride-2 pool, a linear projector and a Qwen2 text model, every parameter randomised. Through the import,
our log-mel features are the feature extractor's, the logits match within 1e-4 (fp32), 16 greedy tokens are
identical, the answer depends on the sound, and a bad file is a clear error; the CLI path as well."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, imported, randomise  # noqa: E402
from test_import_folder import char_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

AUDIO = 100  # the tiny vocabulary's <|AUDIO|> id
MELS, SECONDS, RATE = 16, 1, 16000


def qwen2_audio(out: Path):
    """Weights drawn with std 0.1: at transformers' 0.02 a tone moves the logits by only ~3e-3."""
    _quiet(transformers)
    cfg = transformers.Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, max_source_positions=SECONDS * RATE // 160 // 2, initializer_range=0.1),
        text_config=dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.1),
        audio_token_index=AUDIO, initializer_range=0.1)
    torch.manual_seed(0)
    m = transformers.Qwen2AudioForConditionalGeneration(cfg).eval()
    randomise(m)
    m.save_pretrained(str(out))
    extractor().save_pretrained(str(out))
    char_tokenizer(128, "<|AUDIO|>", AUDIO).save_pretrained(str(out))  # the CLI path reads prompts with it
    return m


def extractor():
    return transformers.WhisperFeatureExtractor(feature_size=MELS, chunk_length=SECONDS, sampling_rate=RATE)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_audio")
    hf = qwen2_audio(tmp / "hf")
    ours, report, mapping = imported(tmp / "hf", tmp)
    assert report.ok and set(mapping["components"]) == {"enc", "proj", "llm"}
    return hf, ours.eval(), mapping, tmp


def _clip(hz: float, seconds: float = 0.6) -> bytes:
    from vlmspec.runtime.inputs.audio import tone

    return tone(seconds, RATE, hz)


def _inputs(ours, wavs: list[bytes]):
    """(HF's features + mask, ours (features, frames), ids [b x s] with one AUDIO per token, attention mask):
    the rows' clips of different lengths are left-padded, as generation pads."""
    from vlmspec.runtime.inputs.audio import log_mel, read_wav

    clips = [read_wav(w) for w in wavs]
    theirs = extractor()([c.samples for c in clips], sampling_rate=RATE, padding="max_length",
                         return_attention_mask=True, return_tensors="pt")
    cfg = ours.components["enc"].cfg
    feats, frames = log_mel(cfg, clips)
    counts = [(((int(n) - 1) // 2 + 1) - 2) // 2 + 1 for n in frames]
    g = torch.Generator().manual_seed(3)
    rows = [[*torch.randint(0, 90, (3,), generator=g).tolist(), *[AUDIO] * n,
             *torch.randint(0, 90, (4,), generator=g).tolist()] for n in counts]
    s = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (s - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (s - len(r)) + [1] * len(r) for r in rows])
    return theirs, (feats, frames), ids, mask


def test_features_match_the_extractor(pair):
    _, ours, _, _ = pair
    theirs, (feats, frames), _, _ = _inputs(ours, [_clip(440.0), _clip(880.0, 0.3)])
    assert torch.equal(frames, theirs["attention_mask"].sum(-1))
    assert float((feats - theirs["input_features"]).abs().max()) < 1e-6


@pytest.mark.parametrize("hz", [[440.0], [440.0, 660.0]], ids=["one", "two-lengths"])
def test_logits_and_greedy_match(pair, hz):
    hf, ours, _, _ = pair
    wavs = [_clip(h, 0.6 - 0.25 * i) for i, h in enumerate(hz)]
    theirs, (feats, frames), ids, mask = _inputs(ours, wavs)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, input_features=theirs["input_features"],
                 feature_attention_mask=theirs["attention_mask"]).logits
        got = ours(ids, mask, image_features=ours.encode_audio(feats, frames)).logits
        real = mask.bool()
        diff = float((ref[real] - got[real]).abs().max())
        assert diff < 1e-4, diff
        print(f"max logit diff {diff:.2e}")
        gen_ref = hf.generate(input_ids=ids, attention_mask=mask, input_features=theirs["input_features"],
                              feature_attention_mask=theirs["attention_mask"], max_new_tokens=16, do_sample=False,
                              min_new_tokens=16)[:, ids.shape[1]:]
        gen = ours.generate(ids, mask, image_features=ours.encode_audio(feats, frames), max_new_tokens=16)
    assert gen.tolist() == gen_ref.tolist()


def test_answer_depends_on_the_audio(pair):
    hf, ours, _, _ = pair
    theirs, (feats, frames), ids, mask = _inputs(ours, [_clip(440.0)])
    other, (feats2, frames2), _, _ = _inputs(ours, [_clip(1500.0)])
    assert torch.equal(frames, frames2)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, input_features=theirs["input_features"],
               feature_attention_mask=theirs["attention_mask"]).logits
        b = hf(input_ids=ids, attention_mask=mask, input_features=other["input_features"],
               feature_attention_mask=other["attention_mask"]).logits
        ours_a = ours(ids, mask, image_features=ours.encode_audio(feats, frames)).logits
        ours_b = ours(ids, mask, image_features=ours.encode_audio(feats2, frames2)).logits
    moved = float((a - b).abs().max())
    print(f"logits move by {moved:.2e} with the tone")
    assert moved > 1e-2  # the reference hears the tone
    assert float((ours_a - ours_b).abs().max()) > 1e-2 and float((ours_b - b).abs().max()) < 1e-4


def test_bad_audio_is_a_clear_error(pair, tmp_path):
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.inputs.audio import log_mel, read_wav, tone

    _, ours, _, _ = pair
    wav = _clip(440.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav[: len(wav) // 2])
    for bad, code in ((cut, "E0610"), (b"not a wav at all", "E0610"), (wav[:20], "E0610")):
        with pytest.raises(UserInputError) as e:
            read_wav(bad)
        assert e.value.diagnostics[0].code == code
    with pytest.raises(UserInputError) as e:  # the extractor refuses another rate; so do we, with a hint
        log_mel(ours.components["enc"].cfg, [read_wav(tone(0.5, 8000))])
    assert e.value.diagnostics[0].code == "E0611" and "8000 Hz" in e.value.diagnostics[0].message
    with pytest.raises(UserInputError) as e:
        ours.encode_audio(torch.zeros(1, MELS, 50))
    assert e.value.diagnostics[0].code == "E0612"
    long = read_wav(_clip(440.0, 2.5))  # longer than the clip: cut to `seconds`, as the extractor cuts it
    feats, frames = log_mel(ours.components["enc"].cfg, [long])
    assert feats.shape[-1] == 100 and int(frames[0]) == 100
    assert np.isfinite(feats.numpy()).all()


def test_cli_import_build_generate_answers_as_transformers(pair, tmp_path):
    """`vlm import-hf -> vlm build -> vlm generate --audio`: the CLI's answer is the decoded greedy tokens of
    transformers given the same prompt ids and the feature extractor's features."""
    from hf_tiny import cli_round_trip
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.audio.answer import prepared
    from vlmspec.runtime.inputs.audio import read_wav
    from vlmspec.runtime.session import load_session

    hf, _, _, tmp = pair
    cli_round_trip(tmp / "hf", tmp_path)
    wav = tmp_path / "tone.wav"
    wav.write_bytes(_clip(523.0, 0.45))
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "built"), "--audio", str(wav), "--prompt", "what is it?",
                                 "--max-new-tokens", "16"])
    assert r.exit_code == 0, r.output
    session = load_session(tmp_path / "built")
    ids, _ = prepared(session, "what is it?", read_wav(wav))
    theirs = extractor()([read_wav(wav).samples], sampling_rate=RATE, padding="max_length",
                         return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=theirs["input_features"],
                          feature_attention_mask=theirs["attention_mask"], max_new_tokens=16, do_sample=False,
                          min_new_tokens=16)[0, ids.shape[1]:].tolist()
    stops = session.facts.stop_ids
    kept = ref[: next((i for i, t in enumerate(ref) if t in stops), len(ref))]
    assert r.output.rstrip("\n") == session.require_processor().decode(kept)


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    from hf_tiny import export_round_trip

    hf, ours, _, tmp = pair
    _, back = export_round_trip(tmp / "hf", tmp_path)
    again = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(back)).eval()
    theirs, _, ids, mask = _inputs(ours, [_clip(440.0)])
    kw = dict(input_ids=ids, attention_mask=mask, input_features=theirs["input_features"],
              feature_attention_mask=theirs["attention_mask"])
    with torch.no_grad():
        assert torch.equal(again(**kw).logits, hf(**kw).logits)
    extracted = transformers.WhisperFeatureExtractor.from_pretrained(str(back))
    assert (extracted.feature_size, extracted.chunk_length, extracted.hop_length) == (MELS, SECONDS, 160)


def test_tiny_spec_trains_its_stages_and_caches(tmp_path):
    """The library's tiny audio spec: each stage (its freeze plan applied by `apply_stage`, the trainer's
    helper) takes an optimizer step that moves what it trains, as many parameters as `vlm summary` counts,
    and nothing it freezes; cached greedy decoding equals uncached (the image-path version of this test skips
    audio models). `vlm train` does not read audio records yet."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.audio import log_mel, read_wav
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.freeze import apply_stage, trainable_count

    root = Path(__file__).resolve().parents[2]
    analysis, _ = load_analysis(f"{root}/specs/qwen2-audio-7b.vlm:qwen2_audio_7b_tiny")
    torch.manual_seed(0)
    model = build_model(analysis)
    feats, frames = log_mel(model.components["enc"].cfg, [read_wav(_clip(440.0)), read_wav(_clip(300.0, 0.3))])
    features = model.encode_audio(feats, frames)
    counts = features["image_lengths"].tolist()
    rows = [[1, 2, *[model.image_token_id] * n, 3, 4, 5] for n in counts]
    s = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (s - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (s - len(r)) + [1] * len(r) for r in rows])
    labels = torch.where((ids == model.image_token_id) | (mask == 0), -100, ids)
    for plan in analysis.plans:
        apply_stage(model, analysis, plan.name)
        assert trainable_count(model) == plan.total_trainable, plan.name
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = model(ids, mask, image_features=model.encode_audio(feats, frames), labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            component = n.split(".")[1]
            moved = not torch.equal(before[n], p.detach())
            assert moved == (plan.status[component] == "trained"), (plan.name, n)
        model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        features = model.encode_audio(feats, frames)
        a = model.generate(ids, mask, image_features=features, max_new_tokens=5)
        b = model.generate(ids, mask, image_features=features, max_new_tokens=5, use_cache=False)
    assert torch.equal(a, b)


def test_server_reads_input_audio_and_refuses_bad_clips(pair, tmp_path):
    import base64

    import httpx
    from hf_tiny import cli_round_trip

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from test_server import Server

    from vlmspec.runtime.serve import ServeConfig, create_app
    from vlmspec.runtime.session import load_session

    _, _, _, tmp = pair
    cli_round_trip(tmp / "hf", tmp_path)
    session = load_session(tmp_path / "built")

    def part(data: bytes, fmt: str = "wav") -> dict:
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}

    def ask(content: list) -> httpx.Response:
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
        return httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)

    wav = _clip(440.0)
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    with Server(create_app(session, ServeConfig(max_batch=2))) as s:
        ok = ask([{"type": "text", "text": "what is it?"}, part(wav)])
        cut = ask([{"type": "text", "text": "what is it?"}, part(wav[: len(wav) // 3])])
        mp3 = ask([part(wav, "mp3")])
        picture = ask([{"type": "image_url", "image_url": {"url": png}}])
    assert ok.status_code == 200, ok.text
    assert cut.status_code == 400 and cut.json()["error"]["code"] == "E0610"
    assert mp3.status_code == 400 and "only `wav`" in mp3.json()["error"]["message"]
    assert picture.status_code == 400 and picture.json()["error"]["code"] == "E0614"


def test_audio_to_an_image_model_is_refused():
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.model import build_model

    root = Path(__file__).resolve().parents[2]
    model = build_model(load_analysis(f"{root}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")[0])
    with pytest.raises(UserInputError) as e:
        model.encode_audio(torch.zeros(1, MELS, 100))
    assert e.value.diagnostics[0].code == "E0613"

"""LLaVA-OneVision video: a tiny `LlavaOnevisionForConditionalGeneration` (every parameter randomised) imported
with `video = frames(num_frames = 8, pool = 2, token_id = ...)`; frames made here (a folder and an MPEG-4 file)
are sampled evenly, read as the tower's square, encoded, pooled 2 x 2 and closed by `image_newline` as
transformers' `get_video_features` does: logits within 1e-4 and 16 greedy tokens identical on the same
`pixel_values_videos` and ids, and `vlm import-hf -> build -> generate --video` answers as transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, assert_sees_image, imported  # noqa: E402
from video_files import write_folder, write_video  # noqa: E402

transformers = pytest.importorskip("transformers")
VID = IMAGE_TOKEN - 1  # the tiny config's `video_token_id`
CLI_VID = IMAGE_TOKEN + 1  # the CLI test's `video_token_id`: `<x101>`, a whole token of the character tokenizer
VIDEO_TOKEN = f"<x{CLI_VID}>"
N_FRAMES = 8


def moving_frames(n: int, size: tuple[int, int] = (56, 40), colour: tuple[int, int, int] = (230, 40, 40),
                  step: int = 3) -> list[np.ndarray]:
    """n RGB frames (w x h = size, not square) of a square moving right over a gradient."""
    w, h = size
    base = np.stack([np.tile(np.linspace(20, 90, w), (h, 1))] * 3, -1)
    out = []
    for i in range(n):
        f = base.copy()
        x = (i * step) % (w - 12)
        f[10:22, x:x + 12] = colour
        out.append(f.astype(np.uint8))
    return out


def _model(tmp_path: Path):
    from test_parity_llava_onevision import onevision

    hf, _ = onevision(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report
    return hf, ours, mapping


def _reader(ours):
    from vlmspec.runtime.inputs.video import VideoReader
    from vlmspec.runtime.video_features import video_encoder

    return VideoReader.from_encoder(ours.components[video_encoder(ours)].cfg, 1)


def test_onevision_video_parity(tmp_path):
    """20 frames sampled to 8 (even steps from frame 0, as transformers' `sample_frames`), each a 32 x 32
    square: 8 x 2 x 2 pooled tokens and one newline; logits and greedy tokens as transformers'."""
    hf, ours, mapping = _model(tmp_path)
    assert f"video = frames(num_frames = {N_FRAMES}, pool = 2, token_id = {VID})" in mapping["spec"]
    assert ours.video_token_id == VID
    clip = _reader(ours)(write_folder(tmp_path / "frames", moving_frames(20)))
    assert clip.indices == torch.arange(0, 20, 20 / N_FRAMES).int().tolist()
    assert clip.frames.shape == (N_FRAMES, 3, 32, 32) and clip.tokens == N_FRAMES * 4 + 1
    pv = clip.frames[None]
    ids = torch.tensor([[1, 5, 7] + [VID] * clip.tokens + [9, 11, 13]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=pv).logits
        features = ours.encode_videos(pv)
        got = ours(ids, image_features=features).logits
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values_videos=p).logits, pv)
    diff = float((ref - got).abs().max())
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values_videos=pv, max_new_tokens=16, do_sample=False)
        mine = ours.generate(ids, image_features=features, max_new_tokens=16)[0]
    theirs = theirs[0, ids.shape[1]:].tolist()
    print(f"onevision video: {clip.tokens} tokens, max logit diff {diff:.2e}, greedy {theirs}")
    assert diff < 1e-4
    assert len(theirs) == 16 and mine.tolist() == theirs


def test_onevision_video_file_reads_as_its_frames(tmp_path):
    """An MPEG-4 file of the frames samples the same source frames as the folder would."""
    _, ours, _ = _model(tmp_path)
    clip = _reader(ours)(write_video(tmp_path / "v.mp4", moving_frames(12)))
    assert clip.indices == torch.arange(0, 12, 12 / N_FRAMES).int().tolist()
    assert clip.frames.shape == (N_FRAMES, 3, 32, 32)


TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|im_start|>user ' }}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
            "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from vlmspec.cli import app

    return CliRunner().invoke(app, args)


def test_cli_generate_video_answers_as_transformers(tmp_path):
    """`vlm import-hf -> build -> generate --video`: the text transformers' greedy generate gives on the chat
    template's prompt with the `<video>` token once per video token and the same frames; two videos, two
    answers."""
    from test_import_folder import QUESTION, char_tokenizer
    from test_parity_llava_onevision import onevision

    hf_dir = tmp_path / "hf"
    onevision(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "video_token_id": CLI_VID}))
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TOKEN]})
    assert tok.convert_tokens_to_ids(VIDEO_TOKEN) == CLI_VID
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(hf_dir))
    (hf_dir / "chat_template.jinja").write_text(TEMPLATE)
    spec = tmp_path / "imported.vlm"
    r = _cli(["import-hf", str(hf_dir), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    assert f"video = frames(num_frames = {N_FRAMES}, pool = 2, token_id = {CLI_VID})" in spec.read_text()
    assert _cli(["fmt", "--check", str(spec)]).exit_code == 0
    r = _cli(["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    ours, _, _ = imported(hf_dir, tmp_path, "again.vlm")
    reader = _reader(ours)
    videos = [write_folder(tmp_path / "red", moving_frames(16)),
              write_folder(tmp_path / "blue", moving_frames(16, colour=(30, 60, 230), step=-2))]
    answers = []
    for path in videos:
        r = _cli(["generate", str(tmp_path / "built"), "--video", str(path), "--prompt", QUESTION,
                  "--max-new-tokens", "12"])
        assert r.exit_code == 0, r.output
        clip = reader(path)
        convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        enc = tok(text.replace("<image>", VIDEO_TOKEN * clip.tokens), return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**enc, pixel_values_videos=clip.frames[None], max_new_tokens=12, do_sample=False)
        want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert r.stdout.rstrip("\n") == want
        answers.append(want)
    assert len(set(answers)) == 2


# ---------------------------------------------------------------- the spec side

def _pooled(tmp_path: Path, frames: str, connector: str = "  connector proj = mlp(clip -> llm) { layers = 2 }\n"):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from diag_cases import POOLED_VIT, spec

    from vlmspec.compiler.compile import load_analysis

    path = tmp_path / "m.vlm"
    path.write_text(spec(vision=POOLED_VIT.format(frames), connector=connector))
    analysis, _ = load_analysis(str(path))
    return analysis


def test_pool_sets_the_token_count(tmp_path):
    """`vlm summary` counts num_frames x ceil(4 / pool)^2 + 1 tokens; the resolved spec keeps `pool`."""
    from vlmspec.compiler.summary import summarise

    for pool, per_frame in [(2, 4), (3, 4), (4, 1)]:
        analysis = _pooled(tmp_path, f"num_frames = 6, pool = {pool}")
        assert summarise(analysis)["video_tokens"]["clip"]["max"] == 6 * per_frame + 1
        text = analysis.ir.components["clip"].config.video.to_vlm()
        assert text == f"frames(num_frames = 6, pool = {pool})"
        again = _pooled(tmp_path, text[len("frames("):-1]).ir.components["clip"].config.video
        assert again.model_dump() == analysis.ir.components["clip"].config.video.model_dump()


def test_pooling_without_a_newline_is_refused(tmp_path):
    """A pooled video ends with the projector's `image_newline`: a plain `mlp` after a fixed encoder has none
    (E0609), and no model output is made."""
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.model import build_model

    model = build_model(_pooled(tmp_path, "num_frames = 2, pool = 2")).eval()
    with pytest.raises(UserInputError) as e:
        model.encode_videos(torch.rand(1, 2, 3, 32, 32))
    assert "E0609" in str(e.value)
    with pytest.raises(UserInputError) as e:
        model.encode_videos(torch.rand(1, 2, 3, 48, 32))
    assert "E0609" in str(e.value)


def test_export_keeps_the_video_settings(tmp_path):
    """`import-hf -> build -> export-hf`: the export's config names the `<video>` id, its video processor
    samples `num_frames`, importing it again writes the same `frames(...)`, and transformers on the export gives
    the logits of the original on a video."""
    from hf_tiny import export_round_trip
    from test_parity_llava_onevision import _folder

    from vlmspec.runtime.weights import import_hf

    hf_dir = tmp_path / "hf"
    _folder(hf_dir)
    _, back = export_round_trip(hf_dir, tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["video_token_id"] == VID
    video = json.loads((back / "video_preprocessor_config.json").read_text())
    assert video["num_frames"] == N_FRAMES and video["do_sample_frames"] is True
    text, _ = import_hf(back)
    assert f"video = frames(num_frames = {N_FRAMES}, pool = 2, token_id = {VID})" in text
    pv = torch.rand(1, N_FRAMES, 3, 32, 32)
    ids = torch.tensor([[1, 5] + [VID] * (N_FRAMES * 4 + 1) + [9]])
    with torch.no_grad():
        a = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(hf_dir)).eval()(
            input_ids=ids, pixel_values_videos=pv).logits
        b = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(back)).eval()(
            input_ids=ids, pixel_values_videos=pv).logits
    assert float((a - b).abs().max()) < 1e-5

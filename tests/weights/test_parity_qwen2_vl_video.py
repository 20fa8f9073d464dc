"""Video through Qwen2-VL and Qwen2.5-VL: `import_hf` + `build_with_weights` against
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` given the same pixel_values_videos,
video_grid_thw (and second_per_grid_ts) and ids: logits within 1e-4 (fp32), 16 greedy tokens identical.

The videos are made here with PyAV (moving coloured squares, 56 x 40, non-square) and as frame folders. Frame
sampling, frame sizes and the patch layout are checked against transformers' own code: `Qwen2VLVideoProcessor`
cannot be built here (its module imports torchvision, which is not installed), so `reference()` compiles its
`sample_frames` and `patchify` and the module's `smart_resize` from the installed source file (they need only
math and torch). Resizing is PIL's bicubic, as for images; transformers' video path resizes with torchvision,
so the pixels themselves are compared by feeding both models the frames vlmspec read.
"""

from __future__ import annotations
import __future__

import ast
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import imported  # noqa: E402
from test_parity_qwen2_vl import END, IMG, MERGE, PATCH, START, TEMPORAL, qwen2_vl  # noqa: E402
from video_files import write_folder, write_video  # noqa: E402

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")

VID = 101
FACTOR = PATCH * MERGE
#: the video processor's frame pixel range: a 40 x 56 frame -> 32 x 64 (2 x 4 merged tokens)
VIDEO_PIXELS = (1024, 4096)


# ---------------------------------------------------------------- transformers' own rule, from its source

def reference() -> types.SimpleNamespace:
    """transformers' `smart_resize`, `Qwen2VLVideoProcessor.sample_frames` and `.patchify`, compiled from the
    installed file (see the module docstring); `sample_frames` / `patchify` bound to a stand-in processor."""
    from transformers.video_utils import VideoMetadata

    path = Path(transformers.__file__).parent / "models" / "qwen2_vl" / "video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    funcs += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("sample_frames", "patchify")]
    assert len(funcs) == 3
    ns: dict = {"math": math, "torch": torch, "VideoMetadata": VideoMetadata}
    code = compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    proc = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=TEMPORAL, min_frames=4, max_frames=768)
    return types.SimpleNamespace(
        smart_resize=ns["smart_resize"],
        sample_frames=lambda *a, **k: ns["sample_frames"](proc, *a, **k),
        patchify=lambda *a, **k: ns["patchify"](proc, *a, **k),
        metadata=VideoMetadata)


def hf_videos(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our frames [b x F x c x h x w] -> (pixel_values_videos, video_grid_thw) by transformers' `patchify`."""
    patches, t, gh, gw = reference().patchify(frames, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return patches.flatten(0, 1), torch.tensor([[t, gh, gw]] * frames.shape[0])


# ---------------------------------------------------------------- videos made here

def square_frames(n: int, size: tuple[int, int] = (56, 40), colour: tuple[int, int, int] = (230, 40, 40),
                  step: int = 4) -> list[np.ndarray]:
    """n RGB frames (w x h = size) of a coloured square moving right over a dim gradient."""
    w, h = size
    base = np.stack([np.tile(np.linspace(20, 90, w), (h, 1))] * 3, -1)
    out = []
    for i in range(n):
        f = base.copy()
        x = (i * step) % (w - 12)
        f[10:22, x:x + 12] = colour
        f[24:34, w - 12 - x:w - x] = colour[::-1]
        out.append(f.astype(np.uint8))
    return out


def video_config(folder: Path, **extra) -> None:
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": VIDEO_PIXELS[0], "max_pixels": VIDEO_PIXELS[1],
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL, "fps": 2.0, "min_frames": 4,
        "max_frames": 768, **extra}))


# ---------------------------------------------------------------- the sampling and resizing rule

@pytest.mark.parametrize("total, video_fps, fps, lo, hi", [
    (10, 5.0, 2.0, 4, 768), (18, 4.0, 2.0, 4, 768), (300, 30.0, 2.0, 4, 768), (300, 30.0, 2.0, 4, 12),
    (7, 24.0, 2.0, 4, 768), (3, 24.0, 2.0, 4, 768), (1000, 29.97, 1.5, 4, 64), (61, 25.0, 0.5, 2, 768)])
def test_sampled_frames_are_transformers(total, video_fps, fps, lo, hi):
    from vlmspec.runtime.inputs.video import SamplingRule, sample_indices

    ref = reference()
    rule = SamplingRule(fps, None, lo, hi, 1, 1, TEMPORAL, FACTOR)
    want = ref.sample_frames(ref.metadata(total_num_frames=total, fps=video_fps), fps=fps, min_frames=lo,
                             max_frames=hi).tolist()
    assert sample_indices(total, video_fps, rule) == want
    for n in (4, 5, 8):
        if n <= total:
            rule = SamplingRule(None, n, lo, hi, 1, 1, TEMPORAL, FACTOR)
            assert sample_indices(total, video_fps, rule) == ref.sample_frames(
                ref.metadata(total_num_frames=total, fps=video_fps), num_frames=n).tolist()


@pytest.mark.parametrize("h, w, lo, hi", [(40, 56, 1024, 4096), (480, 640, 1024, 4096), (40, 56, 8192, 16384),
                                          (33, 250, 256, 2048), (720, 1280, 128 * 28 * 28, 768 * 28 * 28)])
def test_frame_sizes_are_transformers(h, w, lo, hi):
    from vlmspec.runtime.inputs.video import SamplingRule, frame_size

    rule = SamplingRule(2.0, None, 4, 768, lo, hi, TEMPORAL, FACTOR)
    assert frame_size(h, w, rule) == tuple(reference().smart_resize(h, w, factor=FACTOR, min_pixels=lo, max_pixels=hi))


def test_reader_reads_a_file_and_a_folder(tmp_path):
    """A 10-frame file at 5 fps sampled at 2 fps: transformers' indices, frames resized to smart_resize's
    32 x 64; a folder of the same frames is taken as already sampled (all 10 kept, 5 temporal patches)."""
    from vlmspec.runtime.inputs.video import SamplingRule, VideoReader

    rule = SamplingRule(2.0, None, 4, 768, *VIDEO_PIXELS, TEMPORAL, FACTOR)
    reader = VideoReader(rule, "bicubic", lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))
    frames = square_frames(10)
    clip = reader(write_video(tmp_path / "v.mp4", frames))
    ref = reference()
    meta = ref.metadata(total_num_frames=10, fps=5.0)
    assert clip.indices == ref.sample_frames(meta, fps=2.0).tolist() == [0, 2, 5, 7]
    assert clip.frames.shape == (4, 3, 32, 64) and clip.grid == (2, 2, 4) and clip.tokens == 16
    meta.frames_indices = clip.indices
    assert clip.sampled_fps == pytest.approx(meta.sampled_fps)
    folder = reader(write_folder(tmp_path / "frames", frames))
    assert folder.indices == list(range(10)) and folder.grid == (5, 2, 4)
    # decoded frames are the written ones up to the codec's loss
    first = Image.fromarray(frames[0]).resize((64, 32), Image.BICUBIC)
    assert (clip.frames[0] - torch.from_numpy(np.asarray(first, dtype=np.float32)).permute(2, 0, 1)).abs().mean() < 12
    odd = reader(write_folder(tmp_path / "odd", frames[:7]))  # 7 frames -> 6 (whole temporal patches)
    assert odd.indices == ref.sample_frames(ref.metadata(total_num_frames=7, fps=2.0), fps=2.0).tolist()


# ---------------------------------------------------------------- parity

def prompts(tokens: int, pad: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `bos, <vision_start> video tokens <vision_end>, text`, row i left-padded by pad * i."""
    g = torch.Generator().manual_seed(4)
    out = []
    for i in range(rows):
        p = pad * i
        parts = [torch.zeros(p, dtype=torch.long), torch.tensor([1, START]), torch.full((tokens,), VID),
                 torch.tensor([END]), torch.randint(3, 99, (8 - p,), generator=g)]
        out.append(torch.cat(parts))
    mask = (torch.arange(out[0].shape[0])[None] >= torch.tensor([[pad * i] for i in range(rows)])).long()
    return torch.stack(out), mask


def read_videos(ours, analysis, paths: list[Path]):
    from vlmspec.runtime.video_features import video_reader

    reader = video_reader(analysis)
    clips = [reader(p) for p in paths]
    frames = torch.stack([c.frames for c in clips])
    seconds = torch.tensor([c.seconds_per_patch(TEMPORAL) for c in clips])
    return clips, frames, seconds


def check_video_parity(hf, ours, analysis, paths: list[Path], pad: int, time: bool) -> float:
    clips, frames, seconds = read_videos(ours, analysis, paths)
    ids, mask = prompts(clips[0].tokens, pad, rows=len(paths))
    pixel_values_videos, grid = hf_videos(frames)
    assert grid.tolist() == [[c.grid[0], c.grid[1] * MERGE, c.grid[2] * MERGE] for c in clips]
    kw = dict(pixel_values_videos=pixel_values_videos, video_grid_thw=grid, mm_token_type_ids=(ids == VID).int() * 2)
    if time:
        kw["second_per_grid_ts"] = seconds
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kw).logits
        feats = ours.encode_videos(frames, seconds)
        out = ours(ids, attention_mask=mask, image_features=feats).logits
        diff = float((ref[real] - out[real]).abs().max())
        assert diff <= 1e-4, diff
        # one frame changed: both models' logits move, and still agree
        other = frames.clone()
        other[:, 1] = torch.randn(other[:, 1].shape, generator=torch.Generator().manual_seed(9))
        moved = hf(input_ids=ids, attention_mask=mask, **{**kw, "pixel_values_videos": hf_videos(other)[0]}).logits
        assert float((moved[real] - ref[real]).abs().max()) > 1e-2
        mine = ours(ids, attention_mask=mask, image_features=ours.encode_videos(other, seconds)).logits
        assert float((mine[real] - moved[real]).abs().max()) <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMG, VID])
    got = ours.generate(ids, attention_mask=mask, image_features=feats, max_new_tokens=16)
    assert torch.equal(got, want[:, ids.shape[1]:])
    return diff


def two_videos(tmp_path: Path, n: int = 10, fps: int = 5) -> list[Path]:
    return [write_video(tmp_path / "a.mp4", square_frames(n), fps),
            write_video(tmp_path / "b.mp4", square_frames(n, colour=(40, 200, 90), step=3), fps)]


def _import(folder: Path, tmp: Path):
    from vlmspec.compiler.compile import load_analysis

    ours, report, mapping = imported(folder, tmp)
    assert report.ok, str(report)
    analysis, _ = load_analysis(f"{tmp / 'model.vlm'}:{mapping['model']}")
    return ours, analysis, mapping


@pytest.mark.parametrize("pad", [0, 3])
def test_qwen2_vl_video_parity(tmp_path, pad):
    hf = qwen2_vl(tmp_path / "hf", seed=1)
    video_config(tmp_path / "hf")
    ours, analysis, mapping = _import(tmp_path / "hf", tmp_path)
    assert "video = frames(fps = 2.0, min_frames = 4, max_frames = 768, min_pixels = 1024, max_pixels = 4096, " \
           "max_tokens = 128, token_id = 101)" in mapping["spec"]
    assert ours.video_token_id == VID
    check_video_parity(hf, ours, analysis, two_videos(tmp_path), pad, time=False)


def test_qwen2_vl_video_from_a_frame_folder(tmp_path):
    """A folder of 10 frames: all kept (5 temporal patches, more than the 2 x 4 grid's side, so the time ids
    run past the rows and columns and the text after resumes below them, as transformers 5 numbers it)."""
    hf = qwen2_vl(tmp_path / "hf", seed=2)
    video_config(tmp_path / "hf")
    ours, analysis, _ = _import(tmp_path / "hf", tmp_path)
    folder = write_folder(tmp_path / "frames", square_frames(10, colour=(30, 60, 220)))
    check_video_parity(hf, ours, analysis, [folder], 0, time=False)


def test_qwen2_5_vl_video_parity_with_absolute_time(tmp_path):
    """Qwen2.5-VL: windows over each frame's grid, and time ids of `tokens_per_second` per second of video:
    18 frames at 4 fps sampled at 2 fps keep 8 (sampled at 16/9 fps), 1.125 s a temporal patch, 2.25 ids
    apart (floored: 0, 2, 4, 6)."""
    from test_parity_qwen2_5_vl import qwen2_5_vl

    hf = qwen2_5_vl(tmp_path / "hf", seed=1)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vision_config"]["tokens_per_second"] == 4  # transformers' default; the spec reads it
    hf.config.vision_config.tokens_per_second = 2
    cfg["vision_config"]["tokens_per_second"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    video_config(tmp_path / "hf")
    ours, analysis, mapping = _import(tmp_path / "hf", tmp_path)
    assert "tokens_per_second = 2.0" in mapping["spec"]
    paths = two_videos(tmp_path, n=18, fps=4)
    clips, _, seconds = read_videos(ours, analysis, paths)
    assert clips[0].grid == (4, 2, 4) and seconds.tolist() == [1.125, 1.125]
    check_video_parity(hf, ours, analysis, paths, 2, time=True)


def test_time_ids_matter(tmp_path):
    """Without the time ids (every temporal patch at the same time) the logits differ by far more than 1e-4."""
    from vlmspec.runtime.decoding import VIDEO_TIME

    hf = qwen2_vl(tmp_path / "hf", seed=1)
    video_config(tmp_path / "hf")
    ours, analysis, _ = _import(tmp_path / "hf", tmp_path)
    clips, frames, seconds = read_videos(ours, analysis, two_videos(tmp_path))
    ids, mask = prompts(clips[0].tokens, 0)
    with torch.no_grad():
        feats = ours.encode_videos(frames, seconds)
        a = ours(ids, attention_mask=mask, image_features=feats).logits
        b = ours(ids, attention_mask=mask, image_features={**feats, VIDEO_TIME: feats[VIDEO_TIME] * 0}).logits
    assert float((a - b).abs().max()) > 1e-3
    del hf


# ---------------------------------------------------------------- the CLI path

def _folder(tmp_path: Path, seed: int = 2):
    from test_import_folder_qwen_idefics_mllama import qwen_folder

    hf_dir = tmp_path / "hf"
    hf = qwen2_vl(hf_dir, seed=seed)
    tok, _ = qwen_folder(hf_dir)
    video_config(hf_dir)
    return hf_dir, hf, tok


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from vlmspec.cli import app

    return CliRunner().invoke(app, args)


def test_cli_generate_video_answers_as_transformers(tmp_path):
    """`vlm import-hf -> vlm build -> vlm generate --video`: the same text as transformers' greedy generate on
    the prompt Qwen2-VL's processor makes (the chat template with `<|video_pad|>` once per video token) and
    the frames vlmspec read; the two videos get different answers."""
    from test_import_folder_qwen_idefics_mllama import QUESTION

    from vlmspec.runtime.session import load_session
    from vlmspec.runtime.video_features import video_reader

    hf_dir, _, tok = _folder(tmp_path)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    spec = tmp_path / "imported.vlm"
    assert _cli(["import-hf", str(hf_dir), "-o", str(spec)]).exit_code == 0
    r = _cli(["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    reader = video_reader(load_session(tmp_path / "built").analysis)
    answers = []
    for path in two_videos(tmp_path):
        r = _cli(["generate", str(tmp_path / "built"), "--video", str(path), "--prompt", QUESTION,
                  "--max-new-tokens", "12"])
        assert r.exit_code == 0, r.output
        clip = reader(path)
        convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        enc = tok(text.replace("<|image_pad|>", "<|video_pad|>" * clip.tokens), return_tensors="pt")
        pv, grid = hf_videos(clip.frames[None])
        with torch.no_grad():
            out = model.generate(**enc, pixel_values_videos=pv, video_grid_thw=grid,
                                 mm_token_type_ids=(enc["input_ids"] == VID).int() * 2, max_new_tokens=12,
                                 do_sample=False, suppress_tokens=[IMG, VID])
        want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert r.stdout.rstrip("\n") == want
        answers.append(want)
    assert len(set(answers)) == 2


def _error(r, code: str) -> str:
    assert r.exit_code != 0 and code in r.output and "Traceback" not in r.output, r.output
    return r.output


def test_bad_videos_are_clear_errors(tmp_path, monkeypatch):
    hf_dir, _, _ = _folder(tmp_path)
    spec = tmp_path / "imported.vlm"
    assert _cli(["import-hf", str(hf_dir), "-o", str(spec)]).exit_code == 0
    assert _cli(["build", str(spec), "-o", str(tmp_path / "built")]).exit_code == 0
    built = str(tmp_path / "built")

    def gen(video: Path):
        return _cli(["generate", built, "--video", str(video), "--prompt", "what moves?"])

    good = write_video(tmp_path / "good.mp4", square_frames(10))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _error(gen(cut), "E0601")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    _error(gen(tmp_path / "junk.mp4"), "E0601")
    _error(gen(tmp_path / "missing.mp4"), "E0601")
    (tmp_path / "empty").mkdir()
    _error(gen(tmp_path / "empty"), "E0603")
    _error(gen(write_video(tmp_path / "one.mp4", square_frames(1))), "E0603")
    long = write_folder(tmp_path / "long", square_frames(40))  # 40 frames, 20 patches x 8 tokens > max_tokens 128
    assert "max_tokens = 128" in _error(gen(long), "E0602")
    _error(_cli(["generate", built, "--video", str(good), "--image", str(good), "--prompt", "q"]), "E0604")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    assert "vlmspec[video]" in _error(gen(good), "E0600")
    # a frame folder needs no PyAV
    r = gen(write_folder(tmp_path / "frames", square_frames(6)))
    assert r.exit_code == 0, r.output

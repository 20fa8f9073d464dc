"""`vlm export-hf` of a Qwen2-VL spec with `video = frames(...)` writes `video_preprocessor_config.json`, and the
video processor transformers builds from it samples and sizes a video's frames as `vlm generate --video` does on
the built folder: the same source frames (by rate and by count) and the same frame size. `vlm import-hf` of the
export reads the same `frames(...)` back.

`Qwen2VLVideoProcessor` cannot be built here (its module imports torchvision), so, as in
test_parity_qwen2_vl_video.py, its `sample_frames` and `smart_resize` are compiled from the installed source and
driven with the exported file's values, the way `BaseVideoProcessor` reads them (attributes set from the file)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")

sys.path.insert(0, str(Path(__file__).parent))
from test_export_qwen2_vl import SPEC, model_dir  # noqa: E402
from test_import_folder import runner  # noqa: E402
from test_parity_qwen2_vl_video import reference, square_frames  # noqa: E402
from video_files import write_folder, write_video  # noqa: E402

from vlmspec.cli import app  # noqa: E402

RATE = "video = frames(fps = 2.0, min_frames = 4, max_frames = 12, min_pixels = 1024, max_pixels = 2048, max_tokens = 64)"
COUNT = "video = frames(num_frames = 6, max_pixels = 4096, max_tokens = 64)"


def _spec(video: str) -> str:
    text = SPEC.replace("feature = layer(-1).patches\n", f"feature = layer(-1).patches\n    {video}\n")
    assert video in text
    return text


def _export(tmp_path: Path, video: str) -> tuple[Path, dict]:
    from vlmspec.runtime.weights.export import export_hf

    built = model_dir(tmp_path, _spec(video))
    back = export_hf(built, tmp_path / "hf")
    return built, json.loads((back / "video_preprocessor_config.json").read_text())


def _transformers_frames(pre: dict, total: int, video_fps: float, height: int, width: int) -> tuple[list[int], tuple]:
    """The frames transformers' video processor, configured by `pre`, keeps and the size it resizes them to."""
    ref = reference()
    meta = ref.metadata(total_num_frames=total, fps=video_fps)
    kw = {"num_frames": pre["num_frames"]} if "num_frames" in pre else {"fps": pre["fps"]}
    indices = ref.sample_frames(meta, temporal_patch_size=pre["temporal_patch_size"], min_frames=pre["min_frames"],
                                max_frames=pre["max_frames"], **kw).tolist()
    factor = pre["patch_size"] * pre["merge_size"]
    size = ref.smart_resize(height, width, factor=factor, min_pixels=pre["size"]["shortest_edge"],
                            max_pixels=pre["size"]["longest_edge"])
    return indices, size


@pytest.mark.parametrize("video", [RATE, COUNT])
def test_export_writes_a_video_processor_that_samples_as_vlmspec(tmp_path: Path, video: str) -> None:
    from vlmspec.runtime.session import load_session
    from vlmspec.runtime.video_features import video_reader

    built, pre = _export(tmp_path, video)
    assert pre["video_processor_type"] == "Qwen2VLVideoProcessor" and pre["do_sample_frames"] is True
    assert ("num_frames" in pre) != ("fps" in pre)  # transformers refuses both
    assert pre["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    reader = video_reader(load_session(built).analysis)
    for total, fps in ((10, 5.0), (30, 10.0), (40, 8.0)):
        clip = reader(write_video(tmp_path / f"v{total}.mp4", square_frames(total), int(fps)))
        indices, (h, w) = _transformers_frames(pre, total, fps, 40, 56)
        assert clip.indices == indices, (total, fps)
        assert tuple(clip.frames.shape[-2:]) == (h, w)
    if "fps" in pre:  # the rate, bounded: 40 frames at 8 fps -> 10 at 2 fps; 12 at most
        assert pre["fps"] == 2.0 and (pre["min_frames"], pre["max_frames"]) == (4, 12)
        assert pre["size"] == {"shortest_edge": 1024, "longest_edge": 2048}
    else:
        assert pre["num_frames"] == 6 and pre["size"] == {"shortest_edge": 1024, "longest_edge": 4096}


def test_a_spec_without_video_writes_no_video_processor(tmp_path: Path) -> None:
    from vlmspec.runtime.weights.export import export_hf

    back = export_hf(model_dir(tmp_path, SPEC), tmp_path / "hf")
    assert not (back / "video_preprocessor_config.json").exists()


def test_import_of_the_export_reads_the_same_frames(tmp_path: Path) -> None:
    """import-hf of the export: the same sampling and pixel range (the budget is the importer's own: at most half
    the context; the placeholder the config's `video_token_id`, the tokenizer's `<|video_pad|>`), and the same
    frames read from a folder."""
    from vlmspec.runtime.session import load_session
    from vlmspec.runtime.video_features import video_reader

    built, _ = _export(tmp_path, RATE)
    spec = tmp_path / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(tmp_path / "hf"), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    field = re.search(r"video = frames\([^)]*\)", spec.read_text()).group(0)
    assert field == ("video = frames(fps = 2.0, min_frames = 4, max_frames = 12, min_pixels = 1024, "
                     "max_pixels = 2048, max_tokens = 128, token_id = 101)")
    folder = write_folder(tmp_path / "frames", square_frames(9))
    ours = video_reader(load_session(built).analysis)(folder)
    theirs = video_reader(load_session(spec).analysis)(folder)
    assert ours.indices == theirs.indices and torch.equal(ours.frames, theirs.frames)


def test_qwen2_5_vl_video_processor_round_trips(tmp_path: Path) -> None:
    """A Qwen2.5-VL folder with its video processor: import -> build -> export writes the video processor back
    (for `Qwen2_5_VLProcessor`), and importing the export gives the same `frames(...)` (absolute time included)."""
    from hf_tiny import export_round_trip
    from test_import_folder_qwen_idefics_mllama import qwen_folder
    from test_parity_qwen2_5_vl import qwen2_5_vl
    from test_parity_qwen2_vl_video import video_config

    hf_dir = tmp_path / "hf"
    qwen2_5_vl(hf_dir, seed=2, pre=False)
    qwen_folder(hf_dir, max_pixels=96 * 96)
    video_config(hf_dir, max_frames=16)
    (tmp_path / "rt").mkdir()
    export_round_trip(hf_dir, tmp_path / "rt")
    pre = json.loads((tmp_path / "rt" / "exported" / "video_preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (pre["fps"], pre["min_frames"], pre["max_frames"], pre["size"]) == (
        2.0, 4, 16, {"shortest_edge": 1024, "longest_edge": 4096})
    first = re.search(r"video = frames\([^)]*\)", (tmp_path / "rt" / "imported.vlm").read_text()).group(0)
    again = tmp_path / "again.vlm"
    r = runner.invoke(app, ["import-hf", str(tmp_path / "rt" / "exported"), "-o", str(again)])
    assert r.exit_code == 0, r.output
    assert re.search(r"video = frames\([^)]*\)", again.read_text()).group(0) == first
    assert "tokens_per_second" in first

"""Video input: a file (decoded with PyAV) or a folder of frame images -> sampled, resized, normalised frames.

The rule is Qwen2-VL's video processor's, so a video reaches the model as the checkpoint was trained on it:

- **sampling**: at `fps` frames per second of video, the count brought inside [min_frames, max_frames] and
  the video's own length, then rounded down to a whole number of temporal patches; the frames taken at even
  steps of total / count from the first (or `num_frames` frames, rounded to whole temporal patches);
- **resizing**: every frame to one size, `smart_resize` of the video's size into the frame pixel range at
  multiples of patch x merge (the images' rule, with the video's own range);
- **padding**: the last frame repeated until the count is a whole number of temporal patches.

A folder of frames is taken as frames already sampled at the declared `fps` (as qwen-vl-utils treats a list of
frames), so only `max_frames` thins it. Everything is checked before a frame is decoded where it can be (the
count and the size come from the container's header): a video over the spec's `max_tokens` is refused whole.

PyAV is an optional dependency (`pip install "vlmspec[video]"`), imported only when a video file is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.images import _FILTERS, open_image, smart_resize

EXTRA = 'pip install "vlmspec[video]"'
#: file suffixes a frame folder's images may have (sorted by name, they are the frames in order)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True, slots=True)
class SamplingRule:
    """The `frames(...)` block's sampling and budget, with the encoder facts they need."""

    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int
    temporal: int
    factor: int  # pixels per merged token side (patch x merge)
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Video:
    """One video as the model reads it: frames [F x c x H x W] (F a multiple of the temporal patch, the
    padding repeated last frames), which source frames they are, and the rate they were sampled at."""

    frames: Tensor
    indices: list[int]
    sampled_fps: float
    grid: tuple[int, int, int]  # (temporal patches, merged rows, merged columns)
    newline: int = 0  # tokens after the grids (OneVision's one `image_newline` after pooled frames)

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w + self.newline

    def seconds_per_patch(self, temporal: int) -> float:
        """Seconds of video one temporal patch spans (Qwen2.5-VL's `second_per_grid_t`)."""
        return temporal / self.sampled_fps


def sample_indices(total: int, video_fps: float | None, rule: SamplingRule) -> list[int]:
    """The source frames to keep, by Qwen2-VL's rule (see the module docstring); [] when the video is too
    short to fill one temporal patch at the rule's rate."""
    t = rule.temporal
    if rule.num_frames is None and rule.fps is None:  # no sampling: every frame (padded to whole patches later)
        return list(range(total))
    if rule.num_frames is not None:
        count: float = round(rule.num_frames / t) * t
    else:
        rate = video_fps if video_fps else rule.fps
        most = math.floor(min(rule.max_frames, total) / t) * t
        count = total / rate * rule.fps
        count = min(max(count, rule.min_frames), most, total)
        count = math.floor(count / t) * t
    if count <= 0 or count > total:
        return []
    # even steps of total / count from frame 0, in float32 as torch's arange makes them
    return torch.arange(0, total, total / count).int().tolist()


def frame_size(height: int, width: int, rule: SamplingRule) -> tuple[int, int]:
    """Every frame's size after resizing (height, width)."""
    return smart_resize(height, width, rule.factor, rule.min_pixels, rule.max_pixels)


def video_grid(frames: int, height: int, width: int, rule: SamplingRule) -> tuple[int, int, int]:
    """(temporal patches, merged rows, merged columns) of `frames` frames resized to height x width."""
    return -(-frames // rule.temporal), height // rule.factor, width // rule.factor


def _check_budget(name: str, grid: tuple[int, int, int], rule: SamplingRule) -> None:
    tokens = grid[0] * grid[1] * grid[2]
    if rule.max_tokens is not None and tokens > rule.max_tokens:
        raise user_error("E0602", f"{name}: {grid[0]} temporal patches of {grid[1]} x {grid[2]} tokens give "
                         f"{tokens} tokens, over the spec's max_tokens = {rule.max_tokens}",
                         help="lower frames(fps / max_frames / max_pixels), or use a shorter or smaller video")


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise user_error("E0600", "reading a video file needs PyAV, which is not installed",
                         help=f"{EXTRA} (or give a folder of frame images instead of a file)") from None
    return av


def _decode_file(path: Path, rule: SamplingRule) -> tuple[list[Image.Image], list[int], int, float]:
    """(the sampled frames as RGB images, their indices, total frames, the video's fps)."""
    av = _av()
    name = str(path)
    try:
        with av.open(name) as container:
            if not container.streams.video:
                raise user_error("E0603", f"{name} has no video stream (zero frames)", help="give a video file")
            stream = container.streams.video[0]
            total, rate = int(stream.frames or 0), float(stream.average_rate or 0)
            if total <= 0:  # the header does not count them: count by decoding
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            if total <= 0:
                raise user_error("E0603", f"{name} has zero frames", help="give a video with at least "
                                 f"{rule.temporal} frames")
            indices = sample_indices(total, rate, rule)
            if not indices:
                raise user_error("E0603", f"{name}: its {total} frames sample to zero frames (no whole temporal "
                                 f"patch of {rule.temporal} frames at this rate or count)",
                                 help="give a longer video, or a higher fps / a num_frames it holds")
            h, w = frame_size(stream.height, stream.width, rule)
            _check_budget(name, video_grid(len(indices), h, w, rule), rule)
            wanted, frames, seen = set(indices), {}, 0
            for i, frame in enumerate(container.decode(video=0)):
                seen = i + 1
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= indices[-1]:
                    break
    except av.error.FFmpegError as e:
        raise user_error("E0601", f"cannot read video {name}: {e}", help="check the file is a whole, "
                         "readable video (re-encode it with ffmpeg)") from None
    if len(frames) < len(set(indices)):
        raise user_error("E0601", f"video {name} is truncated: its header counts {total} frames but only {seen} "
                         "decode", help="re-encode or re-download the file")
    return [frames[i] for i in indices], indices, total, rate


def _read_folder(path: Path, rule: SamplingRule) -> tuple[list[Image.Image], list[int], int, float]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise user_error("E0603", f"frame folder {path} holds no frame images (zero frames)",
                         help="put the frames in it as " + ", ".join(FRAME_SUFFIXES) + " files, in name order")
    rate = rule.fps or 1.0  # the frames are taken as sampled at the declared rate
    indices = sample_indices(len(files), rate, rule)
    if not indices:
        raise user_error("E0603", f"frame folder {path}: {len(files)} frames are fewer than one temporal patch "
                         f"of {rule.temporal}", help="add frames")
    first = open_image(files[indices[0]])
    h, w = frame_size(first.height, first.width, rule)
    _check_budget(str(path), video_grid(len(indices), h, w, rule), rule)
    frames = [open_image(files[i]) for i in indices]
    if len({f.size for f in frames}) > 1:
        raise user_error("E0601", f"frame folder {path} mixes frame sizes "
                         + ", ".join(sorted({f"{a}x{b}" for a, b in (f.size for f in frames)})),
                         help="give every frame the same size")
    return frames, indices, len(files), rate


class VideoReader:
    """Reads videos for one encoder: `reader(path)` -> `Video` (normalised frames, padded to whole temporal
    patches). `normalise` is the encoder's image normalisation (scale to [0, 1], mean, std)."""

    def __init__(self, rule: SamplingRule, resize: str, normalise: Callable[[Image.Image], Tensor],
                 square: tuple[int, int] | None = None):
        self.rule, self.filter, self.normalise = rule, _FILTERS[resize], normalise
        # `frames(pool = p)` (LLaVA-OneVision): (image_size, pooled side): every frame resized to the square,
        # each giving side x side tokens, one newline after the last
        self.square = square

    @classmethod
    def from_encoder(cls, cfg: Any, factor: int) -> VideoReader:
        """The reader of an encoder with `video = frames(...)`; factor: patch x merge (`video_factor`)."""
        from vlmspec.compiler.video import frame_range
        from vlmspec.runtime.inputs.images import ImageTransform

        v = cfg.video
        if v.pool:
            return cls.pooled(cfg)
        lo, hi = frame_range(cfg)
        rule = SamplingRule(None if v.num_frames else v.fps, v.num_frames, v.min_frames, v.max_frames, lo, hi,
                            cfg.temporal_patch, factor, v.max_tokens)
        norm = ImageTransform(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize)
        return cls(rule, cfg.resize, norm.normalise)

    @classmethod
    def pooled(cls, cfg: Any) -> VideoReader:
        """OneVision's reader: `num_frames` frames taken at even steps over the whole video (the video
        processor's uniform sampling; a frame folder is the video), each resized to the encoder's square."""
        from vlmspec.compiler.video import pooled_side
        from vlmspec.runtime.inputs.images import ImageTransform

        s, n = cfg.image_size, cfg.video.num_frames
        rule = SamplingRule(None, n, n, n, s * s, s * s, 1, s, None)
        norm = ImageTransform(s, list(cfg.mean), list(cfg.std), cfg.resize)
        return cls(rule, cfg.resize, norm.normalise, (s, pooled_side(cfg)))

    def __call__(self, src: str | Path) -> Video:
        path = Path(src)
        if path.is_dir():
            frames, indices, total, rate = _read_folder(path, self.rule)
        elif path.is_file():
            frames, indices, total, rate = _decode_file(path, self.rule)
        else:
            raise user_error("E0601", f"video not found: {path}", help="give a video file or a folder of frames")
        if self.square is not None:
            h = w = self.square[0]
        else:
            h, w = frame_size(frames[0].height, frames[0].width, self.rule)
        pixels = [self.normalise(f.resize((w, h), self.filter)) for f in frames]
        pad = -len(pixels) % self.rule.temporal
        stacked = torch.stack(pixels + [pixels[-1]] * pad)
        sampled_fps = len(indices) / total * rate
        if self.square is not None:
            side = self.square[1]
            return Video(stacked, indices, sampled_fps, (len(pixels), side, side), newline=1)
        return Video(stacked, indices, sampled_fps, video_grid(len(pixels), h, w, self.rule))

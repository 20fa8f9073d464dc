"""Video samples in training: read as generation reads them, written in the prompt as generation writes them.

A stage's data loader (`StageImages`) holds one source and one transform per sample. For a stage with video
records, the source of a video sample is a `VideoRef` and the transform a `MediaTransform`: it gives a still's
transform output for an image path and the spec's `VideoReader` output (`Video`: sampled, resized, normalised
frames, padded to whole temporal patches) for a video, so training sees exactly the frames `vlm generate
--video` would. `video_batch` turns a micro-batch's videos into the model's `videos` / `video_seconds` inputs.

What one forward cannot take is refused with its own error rather than silently changed: stills and videos in
one micro-batch (E0605), videos of different frame counts or sizes in one micro-batch (E0606), and packed rows
of videos (E0607).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.video import Video, VideoReader


@dataclass(frozen=True, slots=True)
class VideoRef:
    """A sample's video (file or frame folder), as `StageImages` holds it beside image paths."""

    path: Path


class MediaTransform:
    """Image path -> the image transform's output; `VideoRef` -> the `Video` the spec's reader makes."""

    def __init__(self, image: Any, reader: VideoReader):
        self.image, self.reader = image, reader

    def __call__(self, src: Any) -> Any:
        if isinstance(src, VideoRef):
            return self.reader(src.path)
        if self.image is None:
            raise user_error("E0605", "this model reads videos but has no image transform for a still image",
                             help="give video records only")
        return self.image(src)


def video_placeholder(processor: Any) -> str:
    """The token a video is written with: the `frames(token_id)` token (Qwen2-VL's `<|video_pad|>`), else the
    image placeholder, as `vlmspec.runtime.video_features.video_slot` writes it for generation."""
    from vlmspec.compiler.video import video_encoders

    names = video_encoders(processor.analysis.ir)
    token_id = processor.analysis.ir.components[names[0]].config.video.token_id if names else None
    if token_id is None:
        return processor.image_token
    token = processor.tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(token, str) or processor.tokenizer.get_vocab().get(token) != token_id:
        raise user_error("E0604", f"the tokenizer has no token for the video placeholder id {token_id}",
                         help="set frames(token_id = ...) to the tokenizer's `<|video_pad|>` id, or drop it to use "
                         "the image placeholder")
    return token


def is_video_batch(items: Sequence[Any], stage: str) -> bool:
    """Whether a micro-batch's items are videos; E0605 when it mixes videos with stills or text-only rows."""
    kinds = {isinstance(x, Video) for x in items}
    if kinds == {True, False}:
        raise user_error("E0605", f"stage `{stage}`: a micro-batch mixes video and non-video samples, which one "
                         "forward cannot take", help="train videos and stills in separate stages, or set the "
                         "stage's `batch` to its `grad_accum` (one sample per micro-batch)")
    return kinds == {True}


def video_batch(items: Sequence[Video], temporal: int, stage: str) -> dict[str, torch.Tensor]:
    """The model's video inputs: `videos` [b x F x c x h x w] and `video_seconds` [b] (seconds of video per
    temporal patch, for absolute time ids). One forward encodes the videos together, so they must share a
    frame count and size (E0606)."""
    shapes = {tuple(v.frames.shape) for v in items}
    if len(shapes) > 1:
        raise user_error("E0606", f"stage `{stage}`: a micro-batch holds videos of {len(shapes)} shapes ("
                         + ", ".join("x".join(map(str, s)) for s in sorted(shapes)) + ")",
                         help="give the stage's videos one length and frame size, or set `batch` to its "
                         "`grad_accum` (one video per micro-batch)")
    return {"videos": torch.stack([v.frames for v in items]),
            "video_seconds": torch.tensor([v.seconds_per_patch(temporal) for v in items], dtype=torch.float32)}


def video_training_batch(processor: Any, examples: Sequence[Any], items: Sequence[Video], transform: MediaTransform,
                         stage: Any) -> dict[str, Any]:
    """A micro-batch of video samples: the processor's right-padded ids and labels, and the videos."""
    if stage.packs:
        refuse_packing(stage.name)
    return {**processor.training_batch(examples, None), **video_batch(items, transform.reader.rule.temporal, stage.name)}


def refuse_packing(stage: str) -> None:
    raise user_error("E0607", f"stage `{stage}` packs rows, but its samples are videos: packed rows number "
                     "one image grid per sample, not a video's time axis", help="drop `packing` from the stage")

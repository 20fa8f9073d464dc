"""Videos in `vlm serve`: `video_url` content parts, as vLLM's chat API takes them.

    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}     a whole file, inline
    {"type": "video_url", "video_url": {"url": "clips/a.mp4"}}                   a file (or a folder of frames)
                                                                                 under --files-root

A video is read whole by the spec's `VideoReader` while the request is prepared, before it is queued: a bad,
truncated or empty video, or one over the spec's `max_tokens`, is a 400 with the reader's message (E0601 -
E0603), and nothing of it reaches the decode thread. An inline video is written to a temporary file for PyAV
and removed once read. The prompt writes the video as `vlm generate --video` does (`video_slot`), so a greedy
answer is the same as generate's.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmspec.runtime.inputs.video import Video

if TYPE_CHECKING:
    from vlmspec.runtime.serve.engine import Engine, GenRequest


@dataclass(frozen=True, slots=True)
class VideoSource:
    """A request's video: inline bytes (a data URL) or a file / frame folder under --files-root."""

    data: bytes | None = None
    path: Path | None = None


def video_source(url: str, files_root: str | None, bad: Any) -> VideoSource:
    """A `video_url` URL -> its source; `bad(message)` is the exception to raise (the app's 400)."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head or not head.startswith("data:video/"):
            raise bad("video_url data URLs must be `data:video/...;base64,...`")
        try:
            return VideoSource(data=base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise bad("video_url holds invalid base64") from None
    if url.startswith(("http://", "https://")):
        raise bad("this server does not fetch remote videos; send the video as a data URL")
    path = url.removeprefix("file://")
    if files_root is None:
        raise bad("local video files are disabled; start the server with --files-root DIR")
    root = Path(files_root).resolve()
    target = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not target.is_relative_to(root):
        raise bad(f"video path is outside the served folder {root}")
    if not target.exists():
        raise bad(f"video not found: {path}")
    return VideoSource(path=target)


def read_video(source: VideoSource, reader: Any) -> Video:
    """The source through the spec's reader (its errors are the request's 400)."""
    if source.path is not None:
        return reader(source.path)
    fd, name = tempfile.mkstemp(suffix=".video")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source.data or b"")
        return reader(name)
    finally:
        os.unlink(name)


@dataclass(frozen=True, slots=True)
class PreparedVideo:
    """A request's video as read, riding where prepared pixels go (`GenRequest.pixels`). `shape` is the
    engine's prefill-group key: videos of one frame count and size prefill together, apart from images."""

    video: Video
    seconds: float

    @property
    def shape(self) -> tuple[Any, ...]:
        return ("video", *self.video.frames.shape)


def prepare_video(engine: Engine, req: GenRequest) -> bool:
    """Read a request's video and lay out its prompt (True), or leave the request to the image path (False)."""
    if not isinstance(req.image, VideoSource):
        return False
    from vlmspec.runtime.video_features import video_reader, video_slot

    reader = video_reader(engine.processor.analysis)  # E0604: the model reads no videos
    clip = read_video(req.image, reader)
    req.pixels = PreparedVideo(clip, clip.seconds_per_patch(reader.rule.temporal))
    slot = video_slot(engine.processor, engine.model, clip.tokens)
    req.ids = engine.processor.encode_chat(req.history, req.question, 1, slot, system=req.system)
    return True


def video_features(engine: Engine, group: list[GenRequest]) -> dict[str, torch.Tensor] | None:
    """A prefill group's videos (one frame count and size) through the vision path; None for other rows."""
    if not group or not isinstance(group[0].pixels, PreparedVideo):
        return None
    frames = torch.stack([r.pixels.video.frames for r in group]).to(engine.device)
    return engine.model.encode_videos(frames, torch.tensor([r.pixels.seconds for r in group]))

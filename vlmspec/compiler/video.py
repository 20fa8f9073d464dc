"""Static checks and token counts of video input (`video = frames(...)` on a dynamic-resolution encoder).

A video's tokens are its temporal patches (`temporal_patch` sampled frames each) times one frame's merged
tokens, so how many a video may give is known before any video is read: the most frames the sampling rule
keeps, at the largest frame area the pixel range allows, capped by the spec's `max_tokens`. That count must
fit in the language model's context with room for a prompt, or no video could ever be answered; the front end
says so here rather than the first long video at run time.

The run time (`vlmspec.runtime.inputs.video`) uses `video_factor` and `frame_range` too, so the numbers
`vlm summary` prints are the ones generation enforces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.diagnostics import DiagnosticSink


@dataclass(frozen=True, slots=True)
class VideoBudget:
    """What one video may cost: the fewest tokens (one temporal patch at the smallest frame area) and the
    most (the most frames at the largest area, capped by `max_tokens`), and the frame-area range."""

    encoder: str
    fewest: int
    most: int
    min_pixels: int
    max_pixels: int


def video_factor(ir: ModelIR, encoder: str) -> int:
    """The side in pixels of one merged token: the encoder's patch times the merge of the connector that
    reads it (Qwen2-VL's 14 x 2 = 28); frame sides are resized to multiples of it."""
    cfg = ir.components[encoder].config
    merge = next((int(getattr(c.config, "merge", 1)) for c in ir.by_role("connector") if encoder in c.sources), 1)
    return int(cfg.patch_size) * merge


def frame_range(cfg: Any) -> tuple[int, int]:
    """[min_pixels, max_pixels] of a frame: the `frames(...)` block's, else the encoder's `dynamic(...)`."""
    video, res = cfg.video, cfg.resolution
    lo = video.min_pixels or getattr(res, "min_pixels", 0) or 1
    hi = video.max_pixels or getattr(res, "max_pixels", 0) or lo
    return lo, hi


def most_frames(cfg: Any) -> int:
    """The most frames the sampling rule keeps, padded to a whole temporal patch."""
    video, t = cfg.video, cfg.temporal_patch
    n = round(video.num_frames / t) * t if video.num_frames else video.max_frames // t * t
    return max(n, t)


def budget(ir: ModelIR, encoder: str) -> VideoBudget:
    cfg = ir.components[encoder].config
    lo, hi = frame_range(cfg)
    f = video_factor(ir, encoder)
    per_frame_most = max(1, hi // (f * f))
    per_frame_fewest = max(1, math.ceil(lo / (f * f)))
    most = most_frames(cfg) // cfg.temporal_patch * per_frame_most
    if cfg.video.max_tokens:
        most = min(most, cfg.video.max_tokens)
    return VideoBudget(encoder, per_frame_fewest, most, lo, hi)


def video_encoders(ir: ModelIR) -> list[str]:
    return [c.name for c in ir.by_role("vision") if getattr(c.config, "video", None) is not None]


def check_video(ir: ModelIR, spans: SpanTable, sink: DiagnosticSink) -> None:
    """E0270-E0274: a `frames(...)` block an encoder cannot use, contradictory sampling, a budget that
    cannot fit the context or fits no video, absolute time ids without M-RoPE."""
    lm = ir.language
    for name in video_encoders(ir):
        cfg = ir.components[name].config
        video = cfg.video
        span = spans.attr(name, "video")
        if isinstance(cfg.resolution, str):
            sink.error("E0270", f"`{name}` reads videos but not at their own size (resolution = {cfg.resolution})",
                       span, help="declare `resolution = dynamic(min_pixels = ..., max_pixels = ...)`: frames are "
                       "resized as Qwen2-VL's processor resizes them")
            continue
        if video.num_frames and "fps" in video.model_fields_set:
            sink.error("E0271", "frames(...) takes `fps` or `num_frames`, not both", span,
                       help="`fps` samples by time; `num_frames` takes that many frames from any video")
            continue
        if video.min_frames > video.max_frames:
            sink.error("E0271", f"frames(...): min_frames = {video.min_frames} is above max_frames = "
                       f"{video.max_frames}", span, help="make min_frames <= max_frames")
            continue
        lo, hi = frame_range(cfg)
        if lo > hi:
            sink.error("E0271", f"frames(...): min_pixels = {lo} is above max_pixels = {hi}", span,
                       help="make min_pixels <= max_pixels")
            continue
        b = budget(ir, name)
        f = video_factor(ir, name)
        if video.max_tokens and video.max_tokens < b.fewest:
            sink.error("E0273", f"frames(max_tokens = {video.max_tokens}) is below the {b.fewest} tokens of the "
                       f"smallest video (one temporal patch at min_pixels = {lo})", span,
                       help=f"raise max_tokens to {b.fewest} or more, or lower min_pixels")
        max_positions = getattr(lm.config, "max_positions", None) if lm is not None else None
        if max_positions is not None and b.most + 1 > max_positions:
            room = max_positions - 1
            patches = most_frames(cfg) // cfg.temporal_patch
            sink.error("E0272", f"one video may give {b.most} tokens ({patches} temporal patches of up to "
                       f"{hi // (f * f)} tokens) but `{lm.name}` reads max_positions = {max_positions}", span,
                       help=f"set `max_tokens = {room}` or less in frames(...), or lower max_frames / max_pixels")
        if video.tokens_per_second is not None and (lm is None or getattr(getattr(lm.config, "rope", None),
                                                                          "sections", None) is None):
            sink.error("E0274", "frames(tokens_per_second = ...) numbers M-RoPE's time axis, but the language "
                       "model has no `rope = mrope(...)`", span,
                       help="drop tokens_per_second, or give the language model `rope = mrope(sections = [...])`")

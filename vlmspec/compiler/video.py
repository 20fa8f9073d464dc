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


def pooled_side(cfg: Any) -> int:
    """One frame's token grid side after `frames(pool = p)`: ceil(patches a side / p), as OneVision's bilinear
    pooling rounds up."""
    return math.ceil(cfg.image_size // cfg.patch_size / cfg.video.pool)


def pooled_tokens(cfg: Any) -> int:
    """A pooled video's tokens: `num_frames` pooled grids and the one `image_newline` after them."""
    return cfg.video.num_frames * pooled_side(cfg) ** 2 + 1


#: `frames(...)` attributes that mean nothing beside `pool` (OneVision takes `num_frames` squares)
_NOT_POOLED = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "max_tokens", "tokens_per_second")


def _check_pooled(ir: ModelIR, name: str, span: Any, sink: DiagnosticSink) -> None:
    """E0275-E0277: OneVision's pooled frames need a fixed square, `num_frames` and room in the context."""
    cfg = ir.components[name].config
    video = cfg.video
    if not isinstance(cfg.resolution, str):
        sink.error("E0275", f"frames(pool = {video.pool}) reads each frame as `{name}`'s image_size square, but "
                   "the encoder has `resolution = dynamic(...)`", span,
                   help="drop `pool` (dynamic-resolution encoders read frames at their own size, Qwen2-VL), or "
                   "drop `resolution = dynamic(...)`")
        return
    extra = [k for k in _NOT_POOLED if k in video.model_fields_set]
    if video.num_frames is None or extra:
        what = "needs `num_frames`" if video.num_frames is None else \
            "takes no " + ", ".join(f"`{k}`" for k in extra)
        sink.error("E0276", f"frames(pool = {video.pool}) {what}: pooled frames are `num_frames` frames sampled "
                   "evenly from the whole video, each the encoder's square", span,
                   help="write `frames(num_frames = 8, pool = 2)` (LLaVA-OneVision's video processor)")
        return
    lm = ir.language
    max_positions = getattr(lm.config, "max_positions", None) if lm is not None else None
    tokens = pooled_tokens(cfg)
    if max_positions is not None and tokens + 1 > max_positions:
        side = pooled_side(cfg)
        most = max(1, (max_positions - 2) // (side * side))
        sink.error("E0277", f"a video gives {tokens} tokens ({video.num_frames} frames of {side} x {side} pooled "
                   f"tokens and a newline) but `{lm.name}` reads max_positions = {max_positions}", span,
                   help=f"set `num_frames = {most}` or less, or raise `pool`")


def budget(ir: ModelIR, encoder: str) -> VideoBudget:
    cfg = ir.components[encoder].config
    if cfg.video.pool:
        area = cfg.image_size * cfg.image_size
        n = pooled_tokens(cfg) if cfg.video.num_frames else 1
        return VideoBudget(encoder, n, n, area, area)
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
    """E0270-E0277: a `frames(...)` block an encoder cannot use, contradictory sampling, a budget that
    cannot fit the context or fits no video, absolute time ids without M-RoPE; OneVision's pooled frames."""
    lm = ir.language
    for name in video_encoders(ir):
        cfg = ir.components[name].config
        video = cfg.video
        span = spans.attr(name, "video")
        if video.pool is not None:
            _check_pooled(ir, name, span, sink)
            continue
        if isinstance(cfg.resolution, str):
            sink.error("E0270", f"`{name}` reads videos but not at their own size (resolution = {cfg.resolution})",
                       span, help="declare `resolution = dynamic(min_pixels = ..., max_pixels = ...)`: frames are "
                       "resized as Qwen2-VL's processor resizes them; or `frames(num_frames = 8, pool = 2)` to read each frame as the "
                       "square (LLaVA-OneVision)")
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

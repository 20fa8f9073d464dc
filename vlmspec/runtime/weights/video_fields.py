"""The `video = frames(...)` field `vlm import-hf` writes for a Qwen2-VL / Qwen2.5-VL folder, and the
`video_preprocessor_config.json` `vlm export-hf` writes back from it.

The video processor's settings come from `video_preprocessor_config.json` (or the `video_processor` entry of
transformers 5's `processor_config.json`, or the image processor's file, as transformers falls back to it), else
Qwen2VLVideoProcessor's defaults with qwen-vl-utils' rate of
2 frames a second. The video placeholder keeps the checkpoint's own id (`video_token_id`), and Qwen2.5-VL's
`tokens_per_second` becomes the absolute time ids. The per-video budget is Qwen2-VL's 16,384 tokens, or half
the context when that is shorter, so the static check (E0272) holds for every imported spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor, read_json
from vlmspec.runtime.weights.spec_text import Raw, need

#: Qwen2VLVideoProcessor's frame pixel range (128 to 768 merged 28 x 28 tokens) and frame counts
DEFAULTS = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28, "min_frames": 4, "max_frames": 768, "fps": 2.0}
#: Qwen2-VL's per-video token budget (qwen-vl-utils' VIDEO_MAX_PIXELS / 28^2 at its default settings)
BUDGET = 16384


def video_processor(folder: str | Path) -> dict[str, Any]:
    """The video processor's settings; without a file of its own, the image processor's, as transformers'
    `AutoVideoProcessor` falls back to `preprocessor_config.json`."""
    pre = read_json(Path(folder) / "video_preprocessor_config.json")
    if not pre:
        nested = read_json(Path(folder) / "processor_config.json").get("video_processor")
        pre = nested if isinstance(nested, dict) else image_processor(folder)
    return pre


def frames_field(config: dict[str, Any], folder: str, max_positions: int, *,
                 tokens_per_second: float | None = None) -> tuple[str, Raw]:
    """("video", `frames(...)`) for the vision block."""
    pre = video_processor(folder)
    size = pre.get("size") or {}
    lo = int(pre.get("min_pixels") or size.get("shortest_edge") or DEFAULTS["min_pixels"])
    hi = int(pre.get("max_pixels") or size.get("longest_edge") or DEFAULTS["max_pixels"])
    need(0 < lo <= hi, f"a video processor pixel range [{lo}, {hi}]")
    num = pre.get("num_frames")
    parts = [f"num_frames = {int(num)}"] if num else [f"fps = {float(pre.get('fps') or DEFAULTS['fps'])}"]
    parts += [f"min_frames = {int(pre.get('min_frames') or DEFAULTS['min_frames'])}",
              f"max_frames = {int(pre.get('max_frames') or DEFAULTS['max_frames'])}",
              f"min_pixels = {lo}", f"max_pixels = {hi}", f"max_tokens = {min(BUDGET, max_positions // 2)}"]
    token = config.get("video_token_id", config.get("video_token_index"))
    if token is not None:
        parts.append(f"token_id = {int(token)}")
    if tokens_per_second is not None:
        parts.append(f"tokens_per_second = {float(tokens_per_second)}")
    return "video", Raw("frames(" + ", ".join(parts) + ")")


def video_processor_file(vis: Any, merge: int, processor_class: str) -> dict[str, Any] | None:
    """`video_preprocessor_config.json` for an encoder config with `video = frames(...)` (None without one):
    transformers' `Qwen2VLVideoProcessor` (what `AutoVideoProcessor` builds for qwen2_vl and qwen2_5_vl) set to
    sample and resize as the spec's `VideoReader` does. `do_sample_frames` is on, with the spec's rate (`fps`) or
    count (`num_frames`, never both: transformers refuses the pair) and frame bounds; frames are resized into the
    video's own pixel range (`frame_range`: the block's, else the encoder's) at multiples of patch x merge with the
    encoder's filter, mean and std. `max_tokens` has no field there (transformers caps tokens only when asked to
    shrink frames), so an import derives its budget again (`frames_field`)."""
    from vlmspec.compiler.video import frame_range

    video = getattr(vis, "video", None)
    if video is None:
        return None
    lo, hi = frame_range(vis)
    rate = {"num_frames": int(video.num_frames)} if video.num_frames else {"fps": float(video.fps)}
    return {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": processor_class,
            "do_sample_frames": True, **rate, "min_frames": int(video.min_frames), "max_frames": int(video.max_frames),
            "do_resize": True, "size": {"shortest_edge": lo, "longest_edge": hi}, "min_pixels": lo, "max_pixels": hi,
            "resample": {name: code for code, name in RESAMPLE.items()}[vis.resize], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(vis.mean),
            "image_std": list(vis.std), "do_convert_rgb": True, "patch_size": vis.patch_size,
            "temporal_patch_size": vis.temporal_patch, "merge_size": merge}

"""The `video = frames(...)` field `vlm import-hf` writes for a Qwen2-VL / Qwen2.5-VL folder.

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

from vlmspec.runtime.weights.hf_folder import image_processor, read_json
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

"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's any-resolution tiles on a SigLIP tower
with a Qwen2 text model, the grid pooled down when it holds over `anyres_max_N` tiles' worth of tokens, and the
images of a prompt with several each read as one padded square. In a spec that is the encoder's `layout =
anyres(..., max_tiles = N, multi_image = square)`; the newline is the projector's `image_newline`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.formats import llava, llava_next
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, does_not_fit
from vlmspec.runtime.weights.spec_text import need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session

_PREFIX = "anyres_max_"
_FRAMES = 8  # frames a video gives when the checkpoint's video processor does not sample its own


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    """LLaVA-NeXT's blocks with OneVision's layout: `vision_aspect_ratio = anyres_max_N` -> `max_tiles = N`."""
    ratio = str(config.get("vision_aspect_ratio", "anyres_max_9"))
    need(ratio.startswith(_PREFIX) and ratio[len(_PREFIX):].isdigit() and int(ratio[len(_PREFIX):]) > 0,
         f"vision_aspect_ratio {ratio} (vlmspec reads `anyres_max_N`)")
    extra = f", max_tiles = {int(ratio[len(_PREFIX):])}, multi_image = square"
    blocks, image_token = llava_next.read(config, folder, llava_next.layout_line(config, folder, extra))
    video = video_line(config, folder)
    if video:
        vision = blocks[0].split("\n")
        at = next(i for i, line in enumerate(vision) if line.strip().startswith("weights ="))
        vision.insert(at, video)
        blocks[0] = "\n".join(vision)
    return blocks, image_token


def video_line(config: dict[str, Any], folder: str) -> str:
    """The encoder's `video = frames(num_frames = N, pool = 2, token_id = V)`: OneVision pools every frame's grid
    2 x 2 (`apply_pooling`); N is the video processor's `num_frames` when it samples (`do_sample_frames`),
    else 8 (the processor then takes the frames it is given); V is the config's `<video>` id. Empty when the
    config names no video token."""
    token = config.get("video_token_id", config.get("video_token_index"))
    if token is None:
        return ""
    path = Path(folder) / "video_preprocessor_config.json"
    video = json.loads(path.read_text()) if path.is_file() else {}
    n = video.get("num_frames") if video.get("do_sample_frames") else None
    return f"    video = frames(num_frames = {int(n or _FRAMES)}, pool = 2, token_id = {int(token)})"


# ------------------------------------------------------------------ export

_HINT = "LLaVA-OneVision is LLaVA-NeXT (one `siglip` or `vit`, a 2-layer `mlp`, a `llama`, a causal `prefix`) with " \
    "`layout = anyres(..., newline = true, unpad = true, max_tiles = N, multi_image = square)`"


def claims(ir: ModelIR) -> bool:
    """LLaVA's shape with OneVision's anyres layout."""
    return [c.kind for c in ir.by_role("connector")] == ["mlp"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"] and llava_next.onevision(ir)


def write(session: Session) -> Export:
    """The LLaVA-OneVision checkpoint: LLaVA's config and keys with the pinpoints and `vision_aspect_ratio`,
    `image_newline` from the connector; the processor is `LlavaOnevisionProcessor`."""
    ir = session.analysis.ir
    (vis,) = ir.by_role("vision")
    layout = vis.config.layout
    does_not_fit(layout.newline and layout.unpad and layout.max_tiles is not None and layout.multi_image == "square",
                 "LLaVA-OneVision", "an anyres layout without newline, unpad, max_tiles or multi_image = square", _HINT)
    does_not_fit(not vis.config.class_token or vis.config.feature.tokens == "patches", "LLaVA-OneVision",
                 "a feature with the class token", _HINT)
    config = llava.llava_config(session)
    config.pop("image_seq_length", None)
    config.update(model_type="llava_onevision", architectures=["LlavaOnevisionForConditionalGeneration"],
                  image_grid_pinpoints=[list(p) for p in layout.pinpoints],
                  vision_aspect_ratio=f"{_PREFIX}{layout.max_tiles}")
    files = llava.processor_files(session)
    s, g = vis.config.image_size, vis.config.image_size // vis.config.patch_size
    image = files["preprocessor_config.json"]
    image.update(image_processor_type="LlavaOnevisionImageProcessor", processor_class="LlavaOnevisionProcessor",
                 size={"height": s, "width": s}, do_center_crop=False, do_pad=True,
                 image_grid_pinpoints=[list(p) for p in layout.pinpoints])
    image.pop("crop_size", None)
    processor = files["processor_config.json"]
    processor.update(processor_class="LlavaOnevisionProcessor", num_image_tokens=g * g,
                     vision_aspect_ratio=f"{_PREFIX}{layout.max_tiles}")
    processor.pop("patch_size", None)
    processor.pop("num_additional_image_tokens", None)
    video = vis.config.video
    if video is not None:  # OneVision pools every frame 2 x 2 and knows no other rate
        does_not_fit(video.pool == 2 and video.num_frames is not None, "LLaVA-OneVision",
                     f"{video.to_vlm()} (transformers pools frames 2 x 2 only)",
                     "write `video = frames(num_frames = N, pool = 2, token_id = ...)`")
        if video.token_id is not None:
            config["video_token_id"] = int(video.token_id)
        files["video_preprocessor_config.json"] = {
            "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
            "size": {"height": s, "width": s}, "do_sample_frames": True, "num_frames": int(video.num_frames),
            "image_mean": list(vis.config.mean), "image_std": list(vis.config.std)}
    return Export(config, llava_next.export_layouts(ir), files)


FORMAT = VLMFormat(
    model_types=("llava_onevision",),
    family=llava_next.family("llava_onevision"),
    components={"clip": "vision", "siglip": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="LlavaOnevisionForConditionalGeneration",
    processor="`LlavaOnevisionProcessor`: `LlavaOnevisionImageProcessor` (LLaVA-NeXT's tiles, the grid pooled to "
              "`anyres_max_N`; the images of a multi-image prompt as padded squares)",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; "
                  "exported",
)

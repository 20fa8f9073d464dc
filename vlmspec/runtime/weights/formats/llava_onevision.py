"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's any-resolution tiles on a SigLIP tower
with a Qwen2 text model, the grid pooled down when it holds over `anyres_max_N` tiles' worth of tokens, and the
images of a prompt with several each read as one padded square. In a spec that is the encoder's `layout =
anyres(..., max_tiles = N, multi_image = square)`; the newline is the projector's `image_newline`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.formats import llava, llava_next
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, does_not_fit
from vlmspec.runtime.weights.spec_text import need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session

_PREFIX = "anyres_max_"


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    """LLaVA-NeXT's blocks with OneVision's layout: `vision_aspect_ratio = anyres_max_N` -> `max_tiles = N`."""
    ratio = str(config.get("vision_aspect_ratio", "anyres_max_9"))
    need(ratio.startswith(_PREFIX) and ratio[len(_PREFIX):].isdigit() and int(ratio[len(_PREFIX):]) > 0,
         f"vision_aspect_ratio {ratio} (vlmspec reads `anyres_max_N`)")
    extra = f", max_tiles = {int(ratio[len(_PREFIX):])}, multi_image = square"
    return llava_next.read(config, folder, llava_next.layout_line(config, folder, extra))


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

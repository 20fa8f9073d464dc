"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): LLaVA's CLIP tower, 2-layer MLP projector and
text model, with images read at any resolution: tiles of the best `image_grid_pinpoints` canvas after a base
tile, laid out after the projector as one grid with the padding cut off and `image_newline` after each row.
In a spec that is the encoder's `layout = anyres(...)`; the newline is the projector's `image_newline`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats import llava
from vlmspec.runtime.weights.formats.base import LLAVA_LM, Export, VLMFormat
from vlmspec.runtime.weights.hf_folder import image_processor
from vlmspec.runtime.weights.spec_text import need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session


def layout_line(config: dict[str, Any], folder: str, extra: str = "") -> str:
    """The encoder's `layout` from the pinpoints (preprocessor_config.json's, else the model config's), with
    `extra` arguments."""
    pinpoints = image_processor(folder).get("image_grid_pinpoints") or config.get("image_grid_pinpoints")
    need(bool(pinpoints), "a LLaVA-NeXT checkpoint without image_grid_pinpoints")
    points = ", ".join(f"[{int(h)}, {int(w)}]" for h, w in pinpoints)
    return f"    layout = anyres(pinpoints = [{points}], newline = true, unpad = true{extra})"


def read(config: dict[str, Any], folder: str, layout: str | None = None) -> tuple[list[str], int]:
    """LLaVA's blocks, the vision block given the anyres layout (`layout`, default LLaVA-NeXT's) in place of
    `fit` (the processor crops nothing: its tiles are already `image_size` squares); the fusion's token count
    left to the layout."""
    siglip = config["vision_config"].get("model_type") == "siglip_vision_model"
    need(config.get("vision_feature_select_strategy", "default") == "default" or siglip,
         "vision_feature_select_strategy full on a CLIP tower (the class token has no place on the grid)")
    blocks, image_token = llava.read(config, folder)
    vision = [line for line in blocks[0].split("\n") if not line.strip().startswith("fit =")]
    at = next(i for i, line in enumerate(vision) if line.strip().startswith("weights ="))
    vision.insert(at, layout or layout_line(config, folder))
    fusion = "  fusion prefix(proj -> llm)"
    return ["\n".join(vision), blocks[1], blocks[2], fusion], image_token


# ------------------------------------------------------------------ export

_HINT = "LLaVA-NeXT is LLaVA (one CLIP `vit`, a 2-layer `mlp`, a `llama`, a causal `prefix`) with `layout = " \
    "anyres(..., newline = true, unpad = true)` on the encoder"


def claims(ir: ModelIR) -> bool:
    """LLaVA's shape with an anyres encoder."""
    return [c.kind for c in ir.by_role("connector")] == ["mlp"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"] and llava.anyres(ir) and not onevision(ir)


def onevision(ir: ModelIR) -> bool:
    """Whether the anyres layout is LLaVA-OneVision's: pooled to `max_tiles`, several images as squares."""
    return any(getattr(v.config.layout, "max_tiles", None) is not None or
               getattr(v.config.layout, "multi_image", "tiles") != "tiles"
               for v in ir.by_role("vision") if not isinstance(getattr(v.config, "layout", "fixed"), str))


def write(session: Session) -> Export:
    """The LLaVA-NeXT checkpoint: LLaVA's config and keys (as transformers 5 saves them) with the pinpoints,
    and `image_newline` from the connector; the processor is `LlavaNextImageProcessor` with those pinpoints."""
    from vlmspec.runtime.weights.formats.base import does_not_fit

    ir = session.analysis.ir
    (vis,) = ir.by_role("vision")
    layout = vis.config.layout
    does_not_fit(layout.newline and layout.unpad, "LLaVA-NeXT", "an anyres layout without newline or unpad", _HINT)
    does_not_fit(vis.config.feature.tokens == "patches", "LLaVA-NeXT", "a feature with the class token", _HINT)
    config = llava.llava_config(session)
    config.pop("image_seq_length", None)
    config.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                  image_grid_pinpoints=[list(p) for p in layout.pinpoints])
    files = llava.processor_files(session)
    s = vis.config.image_size
    files["preprocessor_config.json"].update(
        image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor",
        size={"shortest_edge": s}, do_center_crop=True, crop_size={"height": s, "width": s}, do_pad=True,
        image_grid_pinpoints=[list(p) for p in layout.pinpoints])
    files["processor_config.json"]["processor_class"] = "LlavaNextProcessor"
    return Export(config, export_layouts(ir), files)


def export_layouts(ir: ModelIR) -> dict[str, Any]:
    """Where LLaVA-NeXT-shaped checkpoints keep each component (transformers 5's save), `image_newline`
    beside the projector."""
    (vis,), (con,), lm = ir.by_role("vision"), ir.by_role("connector"), ir.language
    return {vis.name: lay(("vision_tower.", "")),
            con.name: lay(("image_newline", "image_newline"), ("multi_modal_projector.", "")), lm.name: LLAVA_LM[0]}


def family(name: str) -> MultiFamily:
    """The parts of a LLaVA-NeXT-shaped checkpoint (`model_type` `name`): the tower, the projector with
    `image_newline`, the text model; older saves without the `model.` prefix too."""
    return MultiFamily(name, {
        "vision": Part("vision", (lay(("model.vision_tower.vision_model.", "")), lay(("model.vision_tower.", "")),
                                  lay(("vision_tower.vision_model.", "")), lay(("vision_tower.", ""))),
                       sub_config="vision_config"),
        "projector": Part("connector", (lay(("model.image_newline", "image_newline"),
                                            ("model.multi_modal_projector.", "")),
                                        lay(("image_newline", "image_newline"), ("multi_modal_projector.", ""))),
                          kinds=frozenset({"mlp"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "projector", "language": "language"})


FORMAT = VLMFormat(
    model_types=("llava_next",),
    family=family("llava_next"),
    components={"clip": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="LlavaNextForConditionalGeneration",
    processor="`LlavaNextProcessor`: `LlavaNextImageProcessor` (best pinpoint canvas, resize + pad, tiles after a "
              "base tile; as many image tokens as the image's size makes)",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; "
                  "exported",
)

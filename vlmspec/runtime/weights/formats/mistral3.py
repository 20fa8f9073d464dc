"""Mistral 3 (`Mistral3ForConditionalGeneration`, model_type `mistral3`: Mistral Small 3.1): a Pixtral ViT reading
every image at its own size, Mistral 3's projector (RMSNorm, a `spatial_merge_size` x `spatial_merge_size` patch
merger, a 2-layer MLP), a Mistral text model, prefix fusion. PixtralProcessor writes one `[IMG]` per merged
patch, `[IMG_BREAK]` after each row and `[IMG_END]` last, and rounds image sides to patch x merge.

In a spec: `vision vit = pixtral`, `connector proj = pixtral_merger(vit -> llm)`, `language llm = llama`,
`fusion prefix(proj -> llm) { image_token = "[IMG]" }`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats import pixtral_parts
from vlmspec.runtime.weights.formats.base import LLAVA_LM, Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config.get("vision_config") or {}, config.get("text_config") or {}
    need(vc.get("model_type", "pixtral") == "pixtral", f"Mistral 3 vision tower `{vc.get('model_type')}` (Pixtral)")
    merge = int(config.get("spatial_merge_size", 2))
    layer = config.get("vision_feature_layer", -1)
    need(isinstance(layer, int), f"vision_feature_layer {layer} (Mistral 3's projector reads one layer here)")
    vision = pixtral_parts.vision_block(vc, folder, layer, f"{folder}#vision", vc.get("patch_size", 14) * merge)
    pact = config.get("projector_hidden_act", "gelu")
    need(pact in CONNECTOR_ACT, f"projector activation {pact}")
    proj = fields([("merge", merge), ("layers", 2), ("act", CONNECTOR_ACT[pact]),
                   ("bias", bool(config.get("multimodal_projector_bias", False))),
                   ("norm_eps", float(tc.get("rms_norm_eps", 1e-5))), ("weights", f"{folder}#projector")])
    image, _, _ = pixtral_parts.processor_tokens(folder)
    return [
        vision,
        f"  connector proj = pixtral_merger(vit -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc), head_bias=False),
        f"  fusion prefix(proj -> llm) {{\n{fields([('image_token', image)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 10)))


# ------------------------------------------------------------------ export

_HINT = ("Mistral 3 is one `pixtral` encoder, a `pixtral_merger` (2 layers), a `llama` and a causal `prefix` "
         "fusion, unquantized")


def claims(ir: ModelIR) -> bool:
    """A Pixtral merger into a prefix fusion: Mistral 3's shape (what does not fit is then said by `write`)."""
    return [c.kind for c in ir.by_role("connector")] == ["pixtral_merger"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"]


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, "Mistral 3", what, _HINT)


def write(session: Session) -> Export:
    """The Mistral 3 checkpoint of a Mistral-3-shaped model, in the layout transformers saves (`vision_tower.`,
    `multi_modal_projector.`, `language_model.model.` / `language_model.lm_head.`)."""
    from vlmspec.runtime.weights.formats.llava import PIXTRAL_CARRIED, text_config

    ir = session.analysis.ir
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(v) == 1 for v in by.values()), "a model with other than one encoder, connector, LM and fusion")
    vis, con, lm, fus = (by[r][0] for r in ("vision", "connector", "language", "fusion"))
    v, c, t = vis.config, con.config, lm.config
    _fit(vis.kind == "pixtral" and len(v.feature.layers) == 1, f"vision `{vis.name}` ({vis.kind})")
    refuse_unplaced(vis, _fit, PIXTRAL_CARRIED)
    _fit(c.layers == 2 and list(con.sources) == [vis.name] and c.out is None and c.norm_eps == t.norm_eps,
         f"connector `{con.name}` ({c.layers} layers, norm_eps {c.norm_eps} where the text model's is {t.norm_eps})")
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and not t.embed_extra and not t.qkv_bias
         and t.rope == "default" and t.act == "silu", f"language model `{lm.name}` ({lm.kind})")
    _fit(fus.config.prefix_attention == "causal", f"fusion `{fus.name}` with prefix_attention = "
         f"{fus.config.prefix_attention}")
    for comp in (vis, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"`{comp.name}` with quantize = {q} (transformers would serve the unquantized weights)")
    from vlmspec.runtime.weights.formats.llava import ACT_HF

    text = {**text_config(t), "model_type": "mistral", "sliding_window": None}
    config = {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
              "vision_config": pixtral_parts.vision_config(v), "text_config": text,
              "image_token_index": int(session.model.image_token_id), "spatial_merge_size": c.merge,
              "vision_feature_layer": v.feature.layers[0], "projector_hidden_act": ACT_HF[c.act],
              "multimodal_projector_bias": c.bias, "tie_word_embeddings": t.tie_embeddings}
    layouts = {vis.name: lay(("vision_tower.", "")), con.name: lay(("multi_modal_projector.", "")),
               lm.name: LLAVA_LM[0]}
    return Export(config, layouts, pixtral_parts.processor_files(v, fus.config.image_token, c.merge))


FORMAT = VLMFormat(
    model_types=("mistral3",),
    family=MultiFamily("mistral3", {
        "vision": Part("vision", (lay(("model.vision_tower.", "")), lay(("vision_tower.", ""))),
                       sub_config="vision_config"),
        "projector": Part("connector", (lay(("model.multi_modal_projector.", "")),
                                        lay(("multi_modal_projector.", ""))), kinds=frozenset({"pixtral_merger"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "projector", "language": "language"}),
    components={"vit": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="Mistral3ForConditionalGeneration",
    processor="`PixtralProcessor`: `PixtralImageProcessor` (longest edge, sides in whole merged patches); "
              "`[IMG]` per merged patch, `[IMG_BREAK]` per row, `[IMG_END]`",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

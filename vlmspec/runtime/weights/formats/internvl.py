"""InternVL 2.5 / 3 (`InternVLForConditionalGeneration`): an InternViT tower whose images are cut into dynamic tiles
(the grid of `min_patches..max_patches` 448 px tiles closest to the image's aspect ratio, then a thumbnail), each
tile's patch grid pixel-shuffled 2 x 2 and projected by LayerNorm -> Linear -> GELU -> Linear into a Qwen2 /
Llama text model; in the prompt each image is `<img>`, the context token once per visual token, `</img>`. In a
spec that is an `internvit` encoder with `layout = dynamic_tiles(...)`, a `pixel_shuffle` connector and a prefix
fusion whose image token is the context token."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.compiler.schema.base import quote
from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats import internvl_parts as parts
from vlmspec.runtime.weights.formats import llava
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.hf_folder import image_fields, image_processor, read_json
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, Raw, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session

#: InternVL's prompt markers, as its tokenizer names them (`start_image_token`, `end_image_token`,
#: `context_image_token`); a checkpoint's tokenizer config may name others
MARKERS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
LM = (lay(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
      lay(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")))


def markers(folder: str) -> dict[str, str]:
    """The tokenizer's image markers (`tokenizer_config.json`'s `extra_special_tokens`), InternVL's defaults
    where it names none."""
    extra = read_json(Path(folder) / "tokenizer_config.json").get("extra_special_tokens")
    named = extra if isinstance(extra, dict) else {}
    return {k: str(named.get(k, v)) for k, v in MARKERS.items()}


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config.get("vision_config") or {}, config["text_config"]
    ratio = float(config.get("downsample_ratio", 0.5))
    scale = round(1 / ratio)
    need(abs(scale * ratio - 1) < 1e-6, f"downsample_ratio {ratio} (vlmspec shuffles whole N x N blocks)")
    pact = config.get("projector_hidden_act", "gelu")
    need(pact in CONNECTOR_ACT, f"projector activation {pact}")
    pre = image_processor(folder)
    least, most = int(pre.get("min_patches", 1)), int(pre.get("max_patches", 12))
    mark = markers(folder)
    vision = parts.vision_fields(vc, layer=config.get("vision_feature_layer", -1),
                                 strategy=config.get("vision_feature_select_strategy", "default"))
    size = dict(vision)["image_size"]
    vision += image_fields(folder, size, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    start, end = mark["start_image_token"], mark["end_image_token"]
    extra = "".join(f", {k} = {quote(v)}" for k, v in (("start", start), ("end", end))
                    if v != MARKERS[f"{k}_image_token"])
    vision.append(("layout", Raw(f"dynamic_tiles(min = {least}, max = {most}, thumbnail = true{extra})")))
    vision.append(("weights", f"{folder}#vision"))
    proj = fields([("scale", scale), ("act", CONNECTOR_ACT[pact]), ("weights", f"{folder}#projector")])
    fusion = fields([("image_token", mark["context_image_token"])])
    return [
        f"  vision vit = internvit {{\n{fields(vision)}\n  }}",
        f"  connector proj = pixel_shuffle(vit -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc), head_bias=False),
        f"  fusion prefix(proj -> llm) {{\n{fusion}\n  }}",
    ], int(config.get("image_token_id", 151667))


# ------------------------------------------------------------------ export

_HINT = "InternVL is one `internvit` with `layout = dynamic_tiles(...)`, a `pixel_shuffle` (norm, 2 layers, biases) " \
    "into a `llama` and a causal `prefix` fusion"


def claims(ir: ModelIR) -> bool:
    """An InternViT into a pixel shuffle into a prefix fusion."""
    return [c.kind for c in ir.by_role("vision")] == ["internvit"] and \
        [c.kind for c in ir.by_role("connector")] == ["pixel_shuffle"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"]


#: what InternVL's `vision_config` and image processor carry of an `internvit`; every other attribute must be
#: the kind's default
_VISION = {"weights", "dtype", "image_size", "patch_size", "width", "depth", "heads", "mlp", "act",
           "norm", "norm_eps", "attn_bias", "qk_norm", "post_norm", "feature", "mean", "std", "resize", "layout"}


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, "InternVL", what, _HINT)


def write(session: Session) -> Export:
    """The InternVL checkpoint (transformers 5's keys) and `GotOcr2ImageProcessor` + `InternVLProcessor`
    files; the tokenizer (copied from the build) must name InternVL's image markers."""
    ir = session.analysis.ir
    (vis,), (con,), lm, (fus,) = ir.by_role("vision"), ir.by_role("connector"), ir.language, ir.by_role("fusion")
    v, c, t = vis.config, con.config, lm.config
    layout = v.layout
    _fit(getattr(layout, "call", None) == "dynamic_tiles" and layout.thumbnail,
         f"vision `{vis.name}` without layout = dynamic_tiles(..., thumbnail = true)")
    _fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading other than `{vis.name}`")
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and t.rope == "default" and t.act == "silu"
         and not t.embed_extra, f"language model `{lm.name}` ({lm.kind})")
    _fit(fus.config.prefix_attention == "causal", f"fusion `{fus.name}` with prefix_attention = "
         f"{fus.config.prefix_attention}")
    refuse_unplaced(vis, _fit, _VISION)
    refuse_unplaced(con, _fit, {"weights", "dtype", "scale", "act"})
    _fit(t.quantize == "none", f"`{lm.name}` with quantize = {t.quantize} (transformers would serve the unquantized "
         "weights)")
    layers = v.feature.layers
    _fit(len(layers) == 1, f"vision `{vis.name}` with several feature layers")
    _fit(not v.feature.pooled, f"vision `{vis.name}` with feature = pooled (InternVL reads a layer's tokens)")
    config = {
        "model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": {"model_type": "internvl_vision", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
                          "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
                          "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
                          "num_channels": 3, "hidden_act": llava.ACT_HF[v.act], "layer_norm_eps": v.norm_eps,
                          "norm_type": "rms_norm" if v.norm == "rms" else "layer_norm",
                          "attention_bias": v.attn_bias, "use_qk_norm": v.qk_norm,
                          "use_mean_pooling": not v.post_norm, "use_absolute_position_embeddings": True,
                          "use_mask_token": False},
        "text_config": llava.text_config(t),
        "image_token_id": int(session.model.image_token_id), "image_seq_length": con_tile_tokens(session),
        "downsample_ratio": 1 / c.scale, "projector_hidden_act": llava.ACT_HF[c.act],
        "vision_feature_layer": layers[0],
        "vision_feature_select_strategy": "default" if v.feature.tokens == "patches" else "full",
        "tie_word_embeddings": t.tie_embeddings,
    }
    s = v.image_size
    image = {"image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
             "do_resize": True, "size": {"height": s, "width": s}, "resample": llava._RESAMPLE[v.resize],
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean),
             "image_std": list(v.std), "do_convert_rgb": True, "crop_to_patches": True,
             "min_patches": layout.min, "max_patches": layout.max}
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": con_tile_tokens(session)}
    # the keys transformers 5 saves InternVL under: its parts at the top level, the text model as
    # `language_model.model.*` / `language_model.lm_head`
    return Export(config, {vis.name: parts.vision_layout(""), con.name: parts.projector_layout(""),
                           lm.name: LM[1]},
                  {"preprocessor_config.json": image, "processor_config.json": processor})


def con_tile_tokens(session: Session) -> int:
    """Image tokens of one tile after the connector (InternVL's `image_seq_length`)."""
    (con,) = session.analysis.ir.by_role("connector")
    return int(session.analysis.shapes.out[con.name].tile_tokens)


FORMAT = VLMFormat(
    model_types=("internvl",),
    family=MultiFamily("internvl", {
        "vision": Part("vision", parts.VISION_LAYOUTS, kinds=frozenset({"internvit"})),
        "projector": Part("connector", parts.PROJECTOR_LAYOUTS, kinds=frozenset({"pixel_shuffle"})),
        "language": Part("language", LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "projector", "language": "language"}),
    components={"vit": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="InternVLForConditionalGeneration",
    processor="`InternVLProcessor`: `GotOcr2ImageProcessor` with `crop_to_patches` (a grid of `min_patches.."
              "max_patches` tiles by aspect ratio, then a thumbnail; `<img>`, the context token per visual token, "
              "`</img>`)",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; "
                  "exported",
)

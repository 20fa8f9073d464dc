"""DeepSeek-VL hybrid (`DeepseekVLHybridForConditionalGeneration`): a SigLIP low-resolution tower and a SAM
high-resolution tower whose neck (plus a second neck on its first global layer, scaled by a learned alpha)
is brought down to SigLIP's grid by two stride-2 convolutions; the aligner projects each tower to half the
language model's width, concatenates them token by token (high resolution first), GELU, a linear layer;
a Llama text model reads the tokens as a prefix.

The spec: `vision sam = sam { downsample = <SigLIP's grid>  global_neck = <first global layer> }`,
`vision siglip = siglip`, `connector aligner = hybrid(sam + siglip -> llm)`. The processor resizes the
image's longer side to SAM's size, centres it on a square of the mean colour, and SigLIP reads that square
resized: what vlmspec's processor does for encoders of several sizes. `vlm export-hf` writes such a model
back: the config, the keys transformers saves, and DeepseekVLHybridImageProcessor's settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.formats.llava import ACT_HF, text_config
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, VISION_ACT, fields, language_block, need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

#: transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`: DeepseekVLHybridImageProcessor's defaults for both towers
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _side(size: Any, default: int, what: str) -> int:
    if size is None:
        return default
    if isinstance(size, int):
        return size
    need(isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"),
         f"a non-square processor {what} {size}")
    return int(size["height"])


def _image(pre: dict[str, Any], prefix: str, image_size: int) -> list[tuple[str, Any]]:
    """`resize`, `mean`, `std` of one tower from DeepseekVLHybridImageProcessor's settings (`high_res_` ones for
    SAM), refusing a size other than the tower's."""
    size = _side(pre.get(f"{prefix}size"), image_size, f"{prefix}size")
    need(size == image_size, f"a processor {prefix}size {size} other than the tower's image_size {image_size}")
    resample = pre.get(f"{prefix}resample", 3)
    need(resample in RESAMPLE, f"processor {prefix}resample filter {resample}")
    mean, std = pre.get(f"{prefix}image_mean", CLIP_MEAN), pre.get(f"{prefix}image_std", CLIP_STD)
    return [("resize", RESAMPLE[resample]), ("mean", [float(x) for x in mean]), ("std", [float(x) for x in std])]


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, hc, tc = config["vision_config"], config["high_res_vision_config"], config["text_config"]
    need(vc.get("model_type", "siglip_vision_model") == "siglip_vision_model",
         f"DeepSeek-VL low-resolution tower `{vc.get('model_type')}` (SigLIP)")
    need(hc.get("model_type", "sam_vision_model") == "sam_vision_model",
         f"DeepSeek-VL high-resolution tower `{hc.get('model_type')}` (SAM)")
    need(tc.get("model_type", "llama") == "llama", f"DeepSeek-VL text model `{tc.get('model_type')}` (Llama)")
    need(vc.get("num_channels", 3) == 3 and hc.get("num_channels", 3) == 3, "towers of other than 3 image channels")
    pre = image_processor(folder)
    need(pre.get("do_rescale", True) and abs(float(pre.get("rescale_factor", 1 / 255)) * 255 - 1) < 1e-6,
         "a processor that does not scale by 1/255")
    need(pre.get("do_normalize", True) and pre.get("do_resize", True), "a processor that does not resize and normalise")
    need(int(pre.get("min_size", 14)) == 14, f"processor min_size {pre.get('min_size')} (vlmspec keeps 14 pixels)")
    need(pre.get("do_pad", True), "a processor that does not pad to a square (`do_pad = false`: SAM's input would "
         "not be square)")

    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    need(act in VISION_ACT, f"vision activation {act}")
    size, patch = int(vc.get("image_size", 224)), int(vc.get("patch_size", 16))
    grid = size // patch
    siglip = [("image_size", size), ("patch_size", patch), ("width", vc.get("hidden_size", 768)),
              ("depth", vc.get("num_hidden_layers", 12)), ("heads", vc.get("num_attention_heads", 12)),
              ("mlp", vc.get("intermediate_size", 3072)), ("act", VISION_ACT[act]),
              ("norm_eps", vc.get("layer_norm_eps", 1e-6)), ("pool_head", bool(vc.get("vision_use_head", True))),
              *_image(pre, "", size), ("weights", f"{folder}#vision")]

    hact = hc.get("hidden_act", "gelu")
    need(hact in VISION_ACT, f"SAM activation {hact}")
    need(hc.get("use_abs_pos", True), "a SAM tower without absolute positions (`use_abs_pos = false`)")
    hsize, hpatch = hc.get("image_size", 1024), hc.get("patch_size", 16)
    need(isinstance(hsize, int) and isinstance(hpatch, int), f"a SAM image or patch size given per side "
         f"({hsize}, {hpatch}): the `sam` kind reads squares")
    width = int(hc.get("hidden_size", 768))
    globals_ = [int(i) for i in hc.get("global_attn_indexes", [2, 5, 8, 11])]
    need(bool(globals_), "a SAM tower without global attention layers (DeepSeek-VL reads the first one)")
    mlp = hc.get("mlp_dim") or int(width * float(hc.get("mlp_ratio", 4.0)))
    sam = [("image_size", hsize), ("patch_size", hpatch), ("width", width),
           ("depth", hc.get("num_hidden_layers", 12)), ("heads", hc.get("num_attention_heads", 12)), ("mlp", mlp),
           ("act", VISION_ACT[hact]), ("norm_eps", hc.get("layer_norm_eps", 1e-6)),
           ("attn_bias", bool(hc.get("qkv_bias", True))), ("rel_pos", bool(hc.get("use_rel_pos", True))),
           ("window", int(hc.get("window_size", 14)) * hpatch), ("global_layers", globals_),
           ("neck", hc.get("output_channels", 256)), ("downsample", grid), ("global_neck", globals_[0]),
           *_image(pre, "high_res_", hsize), ("weights", f"{folder}#high_res")]
    aligner = fields([("act", CONNECTOR_ACT["gelu"]), ("weights", f"{folder}#aligner")])
    # transformers ties the head to the embedding by the top-level flag (DeepseekVLHybridConfig: true)
    tie = bool(config.get("tie_word_embeddings", True))
    return [
        f"  vision sam = sam {{\n{fields(sam)}\n  }}",
        f"  vision siglip = siglip {{\n{fields(siglip)}\n  }}",
        f"  connector aligner = hybrid(sam + siglip -> llm) {{\n{aligner}\n  }}",
        language_block(tc, f"{folder}#language", tie, head_bias=False),
        f"  fusion prefix(aligner -> llm) {{\n{fields([('tokens', grid * grid)])}\n  }}",
    ], int(config.get("image_token_id", 100015))


# ------------------------------------------------------------------ export

#: the keys transformers saves, per component (the import reads the same)
HIGH_RES = lay(("model.high_res_vision_neck.", "global_neck."), ("model.high_res_vision_proj.", "downsample."),
               ("model.high_res_vision_alpha", "alpha"), ("model.high_res_vision_model.vision_encoder.", ""))
LOW_RES = lay(("model.vision_model.", ""))
ALIGNER = lay(("model.aligner.high_res_vision_proj.", "inputs.0."), ("model.aligner.vision_proj.", "inputs.1."),
              ("model.aligner.proj.", "proj."))
LANGUAGE = lay(("model.language_model.", "model."), ("lm_head.", "lm_head."))
_RESAMPLE_HF = {v: k for k, v in RESAMPLE.items()}
_SAM = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "norm_eps", "attn_bias",
        "rel_pos", "window", "global_layers", "neck", "downsample", "global_neck", "mean", "std", "resize", "weights",
        "dtype"}
_SIGLIP = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "norm_eps", "pool_head",
           "mean", "std", "resize", "weights", "dtype"}


def claims(ir: ModelIR) -> bool:
    """A `hybrid` connector into a prefix fusion: DeepSeek-VL's shape (what does not fit is said by `write`)."""
    return [c.kind for c in ir.by_role("connector")] == ["hybrid"] and \
        [f.kind for f in ir.by_role("fusion")] == ["prefix"]


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, "DeepSeek-VL", what, "DeepSeek-VL is a `sam` (with `downsample` = SigLIP's grid and "
                 "`global_neck` = its first global layer) and a `siglip` read by a `hybrid(sam + siglip -> llm)`, "
                 "a `llama` and a causal `prefix` fusion, unquantized")


def _towers(ir: ModelIR) -> tuple[Component, Component, Component, Component, Component]:
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(len(by["vision"]) == 2 and all(len(by[r]) == 1 for r in ("connector", "language", "fusion")),
         "a model with other than two encoders, one connector, language model and fusion")
    kinds = {v.kind: v for v in by["vision"]}
    _fit(set(kinds) == {"sam", "siglip"}, "encoders " + " and ".join(f"`{v.name}` ({v.kind})" for v in by["vision"]))
    sam, low, con = kinds["sam"], kinds["siglip"], by["connector"][0]
    _fit(list(con.sources) == [sam.name, low.name], f"connector `{con.name}` reading {' + '.join(con.sources)} "
         "(DeepSeek-VL's aligner concatenates the high-resolution tower first)")
    return sam, low, con, by["language"][0], by["fusion"][0]


def _sam_config(sam: Component, low: Component) -> dict[str, Any]:
    h, v = sam.config, low.config
    _fit(h.downsample == v.image_size // v.patch_size and h.global_neck == (h.global_layers or [None])[0],
         f"vision `{sam.name}` with downsample = {h.downsample}, global_neck = {h.global_neck} (transformers "
         "brings SAM to SigLIP's grid and reads the first global layer)")
    _fit(h.window_patches * h.patch_size == h.window, f"vision `{sam.name}` with window = {h.window}")
    refuse_unplaced(sam, _fit, _SAM, {"fit": "pad"})
    return {"model_type": "sam_vision_model", "hidden_size": h.width, "output_channels": h.neck,
            "num_hidden_layers": h.depth, "num_attention_heads": h.heads, "num_channels": h.channels,
            "image_size": h.image_size, "patch_size": h.patch_size, "hidden_act": ACT_HF[h.act],
            "layer_norm_eps": h.norm_eps, "qkv_bias": h.attn_bias, "mlp_dim": h.mlp_dim, "use_abs_pos": True,
            "use_rel_pos": h.rel_pos, "window_size": h.window_patches, "global_attn_indexes": list(h.global_layers)}


def _siglip_config(low: Component) -> dict[str, Any]:
    v = low.config
    _fit(list(v.feature.layers) in ([-1], [v.depth]) and v.feature.tokens == "patches" and v.feature_norm,
         f"vision `{low.name}` with feature = {v.feature.to_vlm()} (DeepSeek-VL reads SigLIP's last_hidden_state)")
    refuse_unplaced(low, _fit, _SIGLIP, {"feature": v.feature})
    return {"model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.channels, "hidden_act": ACT_HF[v.act],
            "layer_norm_eps": v.norm_eps, "vision_use_head": v.pool_head}


def _image_processor(sam: Component, low: Component) -> dict[str, Any]:
    h, v = sam.config, low.config
    return {"image_processor_type": "DeepseekVLHybridImageProcessor", "processor_class": "DeepseekVLHybridProcessor",
            "do_resize": True, "size": {"height": v.image_size, "width": v.image_size},
            "high_res_size": {"height": h.image_size, "width": h.image_size}, "min_size": 14,
            "resample": _RESAMPLE_HF[v.resize], "high_res_resample": _RESAMPLE_HF[h.resize], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std),
            "high_res_image_mean": list(h.mean), "high_res_image_std": list(h.std), "do_pad": True,
            "do_convert_rgb": True}


def write(session: Session) -> Export:
    """The DeepSeek-VL checkpoint of a DeepSeek-VL-shaped model, in the layout transformers saves."""
    ir = session.analysis.ir
    sam, low, con, lm, fus = _towers(ir)
    t = lm.config
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and t.rope == "default" and t.act == "silu"
         and not t.qkv_bias and not t.embed_extra, f"language model `{lm.name}` ({lm.kind})")
    refuse_unplaced(con, _fit, {"act", "out", "weights", "dtype"}, {"act": "gelu"})
    _fit(fus.kind == "prefix" and fus.config.prefix_attention == "causal" and list(fus.sources) == [con.name],
         f"fusion `{fus.name}` ({fus.kind})")
    for comp in (sam, low, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"`{comp.name}` with quantize = {q}")
    image_id = getattr(session.model, "image_token_id", None)
    _fit(image_id is not None, "a model without an image token id (built without a tokenizer)")
    config = {"model_type": "deepseek_vl_hybrid", "architectures": ["DeepseekVLHybridForConditionalGeneration"],
              "vision_config": _siglip_config(low), "high_res_vision_config": _sam_config(sam, low),
              "text_config": text_config(t), "image_token_id": int(image_id), "tie_word_embeddings": t.tie_embeddings}
    layouts = {sam.name: HIGH_RES, low.name: LOW_RES, con.name: ALIGNER, lm.name: LANGUAGE}
    tokens = session.analysis.shapes.out[fus.name].tokens
    files = {"preprocessor_config.json": _image_processor(sam, low),
             "processor_config.json": {"processor_class": "DeepseekVLHybridProcessor", "num_image_tokens": tokens}}
    return Export(config, layouts, files)


FORMAT = VLMFormat(
    model_types=("deepseek_vl_hybrid",),
    family=MultiFamily("deepseek_vl_hybrid", {
        "vision": Part("vision", (LOW_RES,), sub_config="vision_config"),
        # the tower, DeepSeek-VL's second neck, its down-sampler and alpha: one `sam` component
        "high_res": Part("vision", (HIGH_RES,), kinds=frozenset({"sam"})),
        "aligner": Part("connector", (ALIGNER,), kinds=frozenset({"hybrid"})),
        "language": Part("language", (LANGUAGE,), sub_config="text_config"),
    }, {"vision": "vision", "connector": "aligner", "language": "language"}),
    components={"siglip": "vision", "sam": "high_res", "aligner": "aligner", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="DeepseekVLHybridForConditionalGeneration",
    processor="`DeepseekVLHybridProcessor`: the longer side to SAM's size, a square of the mean colour, SigLIP's "
              "image resized from that square",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

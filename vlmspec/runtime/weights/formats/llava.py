"""LLaVA (`LlavaForConditionalGeneration`): CLIP, SigLIP or Pixtral (mistral-community/pixtral-12b; its parts in
`pixtral_parts.py`) vision tower, 2-layer MLP projector, Llama / Mistral / Qwen2 / Phi-3 (a `llama`, its fused
tensors split at load) or Phi-1/2 (`phi`) text model, prefix fusion."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats import pixtral_parts
from vlmspec.runtime.weights.formats.base import LLAVA_LM, Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, VISION_ACT, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config["vision_config"], config["text_config"]
    tower = vc.get("model_type")
    if tower == "pixtral":  # mistral-community/pixtral-12b: a Pixtral tower (formats/pixtral_parts.py)
        return read_pixtral(config, folder)
    need(tower in ("clip_vision_model", "siglip_vision_model"), f"LLaVA vision tower `{tower}` (CLIP or SigLIP)")
    siglip = tower == "siglip_vision_model"
    act = vc.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    need(strategy in ("default", "full"), f"vision_feature_select_strategy {strategy}")
    # "default" drops the first token: CLIP's class token, but one of SigLIP's patches (no class token)
    need(not (siglip and strategy == "default"), "`vision_feature_select_strategy = default` on a SigLIP tower "
         "(it drops a patch, not a class token)")
    feature = (f"layer({layer})" if isinstance(layer, int) else f"layers({list(layer)})") + \
        (".patches" if strategy == "default" else ".all")
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", VISION_ACT[act]),
              ("norm_eps", vc.get("layer_norm_eps", 1e-6 if siglip else 1e-5)), ("feature", feature)]
    if siglip:
        # LLaVA reads SigLIP's hidden states, which stop before its post-LayerNorm (and pooling head)
        vision += [("feature_norm", False), ("pool_head", bool(vc.get("vision_use_head", True)))]
    vision += image_fields(folder, vc["image_size"])  # preprocessor_config.json: fit, resize, mean, std
    vision.append(("weights", f"{folder}#vision"))
    name, kind = ("siglip", "siglip") if siglip else ("clip", "vit")
    pact = config.get("projector_hidden_act", "gelu")
    need(pact in CONNECTOR_ACT, f"projector activation {pact}")
    need(config.get("multimodal_projector_bias", True), "a projector without biases")
    grid = (vc["image_size"] // vc["patch_size"]) ** 2 + (1 if strategy == "full" and not siglip else 0)
    tokens = grid
    proj = fields([("layers", 2), ("act", CONNECTOR_ACT[pact]), ("weights", f"{folder}#projector")])
    return [
        f"  vision {name} = {kind} {{\n{fields(vision)}\n  }}",
        f"  connector proj = mlp({name} -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc), head_bias=False),  # LLaVA's own head: no bias
        f"  fusion prefix(proj -> llm) {{\n{fields([('tokens', tokens)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 32000)))


def read_pixtral(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    """LLaVA with a Pixtral tower: every image at its own size, `[IMG]` per patch and `[IMG_BREAK]` /
    `[IMG_END]` in the prompt, the 2-layer projector into a Mistral text model."""
    vc, tc = config["vision_config"], config["text_config"]
    strategy = config.get("vision_feature_select_strategy", "default")
    need(strategy == "full", f"vision_feature_select_strategy {strategy} on a Pixtral tower (it has no class "
         "token: `default` would drop a patch)")
    vision = pixtral_parts.vision_block(vc, folder, config.get("vision_feature_layer", -1), f"{folder}#vision",
                                        vc.get("patch_size", 16))
    pact = config.get("projector_hidden_act", "gelu")
    need(pact in CONNECTOR_ACT, f"projector activation {pact}")
    need(config.get("multimodal_projector_bias", True), "a projector without biases")
    proj = fields([("layers", 2), ("act", CONNECTOR_ACT[pact]), ("weights", f"{folder}#projector")])
    image, _, _ = pixtral_parts.processor_tokens(folder)
    return [
        vision,
        f"  connector proj = mlp(vit -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc), head_bias=False),
        f"  fusion prefix(proj -> llm) {{\n{fields([('image_token', image)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 10)))


# ------------------------------------------------------------------ export

#: vlmspec activation -> transformers' name (both the tower's and the projector's)
ACT_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
          "relu": "relu"}
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL's codes, as CLIPImageProcessor stores them
_HINT = ("LLaVA is one CLIP-style `vit` (or a `siglip`, or a `pixtral`), a 2-layer `mlp`, a `llama` and a causal "
         "`prefix` fusion, unquantized")
#: the `pixtral` encoder's attributes a `pixtral` vision_config and PixtralProcessor's files hold
PIXTRAL_CARRIED = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "feature",
                   "rope_theta", "mean", "std", "resize", "break_token", "end_token", "weights", "dtype"}


def claims(ir: ModelIR) -> bool:
    """An MLP connector into a prefix fusion: LLaVA's shape (what does not fit is then said by `write`); an
    encoder with an anyres layout is LLaVA-NeXT's."""
    return [c.kind for c in ir.by_role("connector")] == ["mlp"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"] and not anyres(ir)


def anyres(ir: ModelIR) -> bool:
    """Whether a vision encoder reads images at any resolution (`layout = anyres(...)`)."""
    return any(not isinstance(getattr(v.config, "layout", "fixed"), str) for v in ir.by_role("vision"))


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, "LLaVA", what, _HINT)


def llava_config(session: Session) -> dict[str, Any]:
    """The `LlavaConfig` fields of a spec-built model (E0586 when it is not LLaVA-shaped)."""
    analysis = session.analysis
    ir = analysis.ir
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(v) == 1 for v in by.values()), "a model with other than one encoder, connector, LM and fusion")
    vis, con, lm, fus = (by[r][0] for r in ("vision", "connector", "language", "fusion"))
    v, c, t = vis.config, con.config, lm.config
    siglip, pixtral = vis.kind == "siglip", vis.kind == "pixtral"
    if pixtral:  # mistral-community/pixtral-12b: every attribute the `pixtral_vision` config holds, no other
        refuse_unplaced(vis, _fit, PIXTRAL_CARRIED)
    else:
        tower = (not v.class_token and not v.pre_norm and v.patch_bias) if siglip else \
            (vis.kind == "vit" and v.class_token and v.pre_norm and not v.patch_bias)
        _fit(tower and v.position == "learned" and not v.feature_norm and v.norm == "layer" and not v.gated_mlp
             and not v.window and v.resolution == "fixed" and not v.tiles and v.temporal_patch == 1,
             f"vision `{vis.name}` ({vis.kind})")
        _fit(v.attn_bias and not v.global_layers and not v.tile_padding,
             f"vision `{vis.name}` without attention biases or with global layers / tile padding")
    _fit(c.layers == 2 and not c.norm and (c.hidden is None or c.hidden == t.width)
         and list(con.sources) == [vis.name], f"connector `{con.name}` ({con.kind}, {c.layers} layers)")
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and t.rope == "default" and t.act == "silu",
         f"language model `{lm.name}` ({lm.kind})")
    _fit(not t.embed_extra, f"language model `{lm.name}` with embed_extra = {t.embed_extra}")
    _fit(fus.config.prefix_attention == "causal", f"fusion `{fus.name}` with prefix_attention = "
         f"{fus.config.prefix_attention}")
    for comp in (vis, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"`{comp.name}` with quantize = {q} (transformers would serve the unquantized weights)")
    layers = list(v.feature.layers)
    tokens = analysis.shapes.out[fus.name].tokens
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": pixtral_parts.vision_config(v) if pixtral else vision_config(vis),
        "text_config": {**text_config(t), "model_type": "mistral", "sliding_window": None} if pixtral
        else text_config(t),
        "image_token_index": int(session.model.image_token_id), "image_seq_length": tokens,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": "full" if pixtral else select_strategy(vis),
        "projector_hidden_act": ACT_HF[c.act], "multimodal_projector_bias": True,
        "tie_word_embeddings": t.tie_embeddings,
    }


def text_config(t: Any) -> dict[str, Any]:
    """A `llama` language model's `text_config`: Qwen2's when its q / k / v projections are biased."""
    out = {"model_type": "qwen2" if t.qkv_bias else "llama", "vocab_size": t.vocab, "hidden_size": t.width,
           "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
           "num_key_value_heads": t.n_kv, "head_dim": t.hd, "max_position_embeddings": t.max_positions,
           "rms_norm_eps": t.norm_eps, "rope_theta": t.rope_theta, "tie_word_embeddings": t.tie_embeddings,
           "hidden_act": "silu"}
    if not t.qkv_bias:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def vision_config(vis: Any) -> dict[str, Any]:
    """The tower's `vision_config`: CLIP's, or SigLIP's (with or without its pooling head)."""
    v = vis.config
    out = {"model_type": "siglip_vision_model" if vis.kind == "siglip" else "clip_vision_model",
           "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
           "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
           "num_channels": v.channels, "hidden_act": ACT_HF[v.act], "layer_norm_eps": v.norm_eps}
    if vis.kind == "siglip":
        out["vision_use_head"] = bool(v.pool_head)
    return out


def select_strategy(vis: Any) -> str:
    """`default` drops the first token: a class token's place; a tower without one (SigLIP) reads `full`.
    No strategy reads a pooled vector (transformers would feed the projector the layer's tokens)."""
    _fit(not vis.config.feature.pooled, f"vision `{vis.name}` with feature = pooled (LLaVA's projector reads a "
         "layer's tokens, `vision_feature_select_strategy` default or full; a pooled vector has no such setting)")
    return "default" if vis.config.class_token and vis.config.feature.tokens == "patches" else "full"


def processor_files(session: Session) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (the image processor doing what the spec's image transform does: for
    `fit = stretch` CLIPImageProcessor's exact resize to the encoder's size; for `crop` its shortest-edge
    resize and centre crop; for `pad` LlavaImageProcessor's square of the mean colour first; then rescale
    and normalise) and `processor_config.json` (LlavaProcessor)."""
    (vis,) = session.analysis.ir.by_role("vision")
    (fus,) = session.analysis.ir.by_role("fusion")
    v = vis.config
    s = v.image_size
    fit = getattr(v, "fit", "stretch")
    image = {"image_processor_type": "LlavaImageProcessor" if fit == "pad" else "CLIPImageProcessor",
             "processor_class": "LlavaProcessor", "do_resize": True,
             "size": {"height": s, "width": s} if fit == "stretch" else {"shortest_edge": s},
             "resample": _RESAMPLE[v.resize], "do_center_crop": fit != "stretch",
             "crop_size": {"height": s, "width": s}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std),
             "do_convert_rgb": True}
    if fit == "pad":
        image["do_pad"] = True
    processor = {"processor_class": "LlavaProcessor", "patch_size": v.patch_size,
                 "vision_feature_select_strategy": select_strategy(vis),
                 "num_additional_image_tokens": 1 if v.class_token else 0, "image_token": fus.config.image_token}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def write(session: Session) -> Export:
    """The LLaVA checkpoint of a LLaVA-shaped model, in the layout transformers saves (`vision_tower.`,
    `multi_modal_projector.`, `language_model.model.` / `language_model.lm_head.`)."""
    config = llava_config(session)
    ir = session.analysis.ir
    (vis,), (con,), lm = ir.by_role("vision"), ir.by_role("connector"), ir.language
    files = pixtral_parts.processor_files(vis.config, ir.by_role("fusion")[0].config.image_token, 1) \
        if vis.kind == "pixtral" else processor_files(session)
    return Export(config, {vis.name: lay(("vision_tower.", "")), con.name: lay(("multi_modal_projector.", "")),
                           lm.name: LLAVA_LM[0]}, files)


FORMAT = VLMFormat(
    model_types=("llava",),
    family=MultiFamily("llava", {
        "vision": Part("vision", (lay(("model.vision_tower.vision_model.", "")), lay(("model.vision_tower.", "")),
                                  lay(("vision_tower.vision_model.", "")), lay(("vision_tower.", ""))),
                       sub_config="vision_config"),
        "projector": Part("connector", (lay(("model.multi_modal_projector.", "")),
                                        lay(("multi_modal_projector.", ""))), kinds=frozenset({"mlp"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "projector", "language": "language"}),
    components={"clip": "vision", "siglip": "vision", "vit": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="LlavaForConditionalGeneration",
    processor='`LlavaProcessor`: `CLIPImageProcessor` (resize, centre crop) or `LlavaImageProcessor` (pad to a square); '
              'with a Pixtral tower `PixtralProcessor` (see `mistral3`, merge 1)',
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

"""Kosmos-2 (`Kosmos2ForConditionalGeneration`): a CLIP ViT whose last layer's tokens (class token included) pass
through its post-LayerNorm and are L2-normalised, Kosmos-2's image-to-text projection (`latent_queries`: a dense
layer, then 64 learned queries attend over [features; queries]) and Kosmos-2's own decoder (`kosmos2`).

Kosmos2Processor writes `<s><image>`, 64 placeholders, `</image>`, then the text (`<grounding>` first when
the answer should name boxes as `<patch_index_NNNN>` tokens). Its placeholders are the ids after `<unk>`
(unk + 1 ... unk + 64), whose embeddings the image features replace; vlmspec writes `<unk>` 64 times instead,
which gives the same model input (only the replaced embeddings differ), so the fusion's image token is `<unk>`.

In a spec: `vision clip = vit { feature = layer(-1).all  feature_norm = true }`,
`connector proj = latent_queries(clip -> llm)`, `language llm = kosmos2`, `fusion prefix(proj -> llm)` on
`<unk>`, and `prompt = "<image>{image}</image><grounding>{q}"`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vlmspec.compiler.schema.base import quote
from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.blip2 import components
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import RESAMPLE, folder_tokenizer, image_fields
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

#: what Kosmos2Processor writes around the image (fixed strings in transformers)
BOI, EOI, GROUNDING = "<image>", "</image>", "<grounding>"
PROMPT = BOI + "{image}" + EOI + GROUNDING + "{q}"
PLACEHOLDER = "<unk>"
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_TEXT_DEFAULTS = {"vocab_size": 65037, "max_position_embeddings": 2048, "embed_dim": 2048, "layers": 24,
                  "ffn_dim": 8192, "attention_heads": 32, "activation_function": "gelu", "layer_norm_eps": 1e-5,
                  "scale_embedding": True, "pad_token_id": 1, "add_cross_attention": False}
_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 14,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_TEXT_ACT = {"gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "silu": "silu"}


def _tied(config: dict[str, Any], tc: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", True)))


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    tc = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    act = vc["hidden_act"]
    need(act in VISION_ACT, f"vision activation {act}")
    need(int(vc["num_channels"]) == 3, f"{vc['num_channels']} image channels")
    need(isinstance(vc["image_size"], int) and isinstance(vc["patch_size"], int),
         f"a non-square vision tower (image_size {vc['image_size']}, patch_size {vc['patch_size']})")
    need(not tc["add_cross_attention"], "a Kosmos-2 text model with cross-attention layers")
    tact = tc["activation_function"]
    need(tact in _TEXT_ACT, f"text activation {tact}")
    need(tc["pad_token_id"] is not None, "a Kosmos-2 text model without pad_token_id (its positions start after it)")
    queries = int(config.get("latent_query_num", 64))
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", VISION_ACT[act]), ("norm_eps", vc["layer_norm_eps"]),
              ("feature", "layer(-1).all"), ("feature_norm", True)]
    vision += image_fields(folder, vc["image_size"], mean=_CLIP_MEAN, std=_CLIP_STD)
    vision.append(("weights", f"{folder}#vision"))
    proj = [("latents", queries), ("heads", tc["attention_heads"]), ("weights", f"{folder}#projector")]
    text = [("width", tc["embed_dim"]), ("depth", tc["layers"]), ("heads", tc["attention_heads"]),
            ("ffn", tc["ffn_dim"]), ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"]),
            ("norm_eps", tc["layer_norm_eps"]), ("act", _TEXT_ACT[tact]), ("pad_id", int(tc["pad_token_id"])),
            ("scale_embed", bool(tc["scale_embedding"])), ("tie_embeddings", _tied(config, tc)),
            ("weights", f"{folder}#language")]
    placeholder, image_id, bins = PLACEHOLDER, 3, None
    tok = folder_tokenizer(folder)
    if tok is not None:
        vocab = tok.get_vocab()
        need(tok.unk_token is not None and tok.unk_token in vocab, "a Kosmos-2 tokenizer without an unk token")
        need(BOI in vocab and EOI in vocab, f"a Kosmos-2 tokenizer without `{BOI}` and `{EOI}`")
        placeholder, image_id = str(tok.unk_token), int(vocab[tok.unk_token])
        bins = grid_bins(patch_index_count(vocab))
    settings = [f"  prompt = {quote(PROMPT)}"]  # the layout Kosmos2Processor builds
    if bins is not None:  # the grid its `<patch_index_NNNN>` tokens name: what `vlm generate --boxes` reads
        settings.append(f"  boxes = patch_index(bins = {bins})")
    return [
        f"  vision clip = vit {{\n{fields(vision)}\n  }}",
        f"  connector proj = latent_queries(clip -> llm) {{\n{fields(proj)}\n  }}",
        f"  language llm = kosmos2 {{\n{fields(text)}\n  }}",
        f"  fusion prefix(proj -> llm) {{\n{fields([('image_token', placeholder), ('tokens', queries)])}\n  }}",
        *settings,
    ], image_id


def patch_index_count(vocab: dict[str, int]) -> int:
    """How many `<patch_index_NNNN>` tokens the tokenizer holds (Kosmos2Processor adds bins x bins of them)."""
    return sum(1 for t in vocab if t.startswith("<patch_index_"))


def grid_bins(count: int) -> int | None:
    """The grid side of `count` cell tokens; None without any, and a refusal when they are not a square."""
    if count == 0:
        return None
    side = math.isqrt(count)
    need(side * side == count, f"{count} patch-index tokens (Kosmos-2's grid is square: bins x bins)")
    return side


# ------------------------------------------------------------------ export

_NAME = "Kosmos-2"
_VIT = {"image_size", "patch_size", "width", "depth", "heads", "mlp", "act", "norm_eps", "feature",
        "mean", "std", "resize", "fit", "weights", "dtype"}
_KOSMOS2 = {"width", "depth", "heads", "ffn", "vocab", "max_positions", "norm_eps", "act", "pad_id", "scale_embed",
            "tie_embeddings", "weights", "tokenizer", "dtype"}
_TEXT_ACT_HF = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def claims(ir: ModelIR) -> bool:
    """A `latent_queries` connector: Kosmos-2's shape (what does not fit is said by `write`)."""
    return [c.kind for c in ir.by_role("connector")] == ["latent_queries"]


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, "Kosmos-2 is one CLIP-style `vit` read at `layer(-1).all` with `feature_norm`, "
                 "a normalising `latent_queries` connector, a `kosmos2` language model and a `prefix` fusion, "
                 f"unquantized, with prompt = \"{PROMPT}\"")


def _vision(vis: Component) -> dict[str, Any]:
    v = vis.config
    _fit(vis.kind == "vit", f"vision `{vis.name}` ({vis.kind})")
    _fit(list(v.feature.layers) in ([-1], [v.depth]) and v.feature.tokens == "all",
         f"vision `{vis.name}` with feature = {v.feature.to_vlm()} (Kosmos-2 reads the last layer's tokens)")
    refuse_unplaced(vis, _fit, _VIT, {"feature_norm": True})
    return {"model_type": "kosmos_2_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3, "hidden_act": ACT_HF[v.act], "layer_norm_eps": v.norm_eps}


def _text(lm: Component, session: Session) -> dict[str, Any]:
    t = lm.config
    _fit(lm.kind == "kosmos2", f"language model `{lm.name}` ({lm.kind})")
    refuse_unplaced(lm, _fit, _KOSMOS2)
    ids = special_token_ids(session)
    ids["pad_token_id"] = t.pad_id  # the positions' offset is the pad id: the config must name the spec's
    return {"model_type": "kosmos_2_text_model", "vocab_size": t.vocab, "max_position_embeddings": t.max_positions,
            "embed_dim": t.width, "layers": t.depth, "ffn_dim": t.ffn, "attention_heads": t.heads,
            "activation_function": _TEXT_ACT_HF[t.act], "layer_norm_eps": t.norm_eps,
            "scale_embedding": t.scale_embed, "tie_word_embeddings": t.tie_embeddings, **ids}


def _image_processor(vis: Component) -> dict[str, Any]:
    """CLIPImageProcessor doing what the spec's transform does (a plain resize to the tower's size, or the
    shortest-edge resize and centre crop), then rescale and normalise."""
    v = vis.config
    s, fit = v.image_size, getattr(v, "fit", "stretch")
    _fit(fit in ("stretch", "crop"), f"vision `{vis.name}` with fit = {fit}")
    inverse = {name: code for code, name in RESAMPLE.items()}
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "Kosmos2Processor", "do_resize": True,
            "size": {"height": s, "width": s} if fit == "stretch" else {"shortest_edge": s},
            "resample": inverse[v.resize], "do_center_crop": fit == "crop", "crop_size": {"height": s, "width": s},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean),
            "image_std": list(v.std), "do_convert_rgb": True}


def write(session: Session) -> Export:
    """The Kosmos-2 checkpoint of a Kosmos-2-shaped model, in the layout `save_pretrained` writes
    (`vision_model.model.`, `image_to_text_projection.`, `text_model.model.` / `text_model.lm_head.`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = components(ir, _fit)
    vision, text = _vision(vis), _text(lm, session)
    c = con.config
    _fit(con.kind == "latent_queries" and list(con.sources) == [vis.name] and c.normalize and c.heads == lm.config.heads,
         f"connector `{con.name}` ({con.kind}; Kosmos-2's normalises and has the text model's heads)")
    refuse_unplaced(con, _fit, {"latents", "heads", "normalize", "weights", "dtype"})
    _fit(fus.kind == "prefix" and list(fus.sources) == [con.name], f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, _fit, {"tokens", "image_token"})
    settings = ir.settings
    _fit(settings.chat_template is None and not settings.system and settings.prompt == PROMPT,
         f"prompt = \"{settings.prompt}\" (Kosmos2Processor lays out `<s><image>`, the image, `</image>`, the text)")
    tok = session.tokenizer
    if tok is not None:
        _fit(fus.config.image_token == tok.unk_token, f"image_token = \"{fus.config.image_token}\" (Kosmos2Processor's "
             f"placeholders follow the unk token `{tok.unk_token}`; the spec writes that token)")
    config = {"model_type": "kosmos-2", "architectures": ["Kosmos2ForConditionalGeneration"],
              "vision_config": vision, "text_config": text, "latent_query_num": c.latents,
              "tie_word_embeddings": lm.config.tie_embeddings}
    layouts = {vis.name: _VISION[0], con.name: _PROJECTOR[0], lm.name: _LM[0]}
    if tok is None:
        return Export(config, layouts)
    patches = patch_index_count(tok.get_vocab())
    boxes = settings.boxes
    _fit(boxes is None or (boxes.kind == "patch_index" and boxes.bins ** 2 == patches),
         f"boxes = {boxes.to_vlm() if boxes is not None else ''} with {patches} `<patch_index_NNNN>` tokens in the "
         "tokenizer (Kosmos2Processor's grid is bins x bins of them)")
    files = {"preprocessor_config.json": _image_processor(vis),
             "processor_config.json": {"processor_class": "Kosmos2Processor", "num_patch_index_tokens": patches}}
    return Export(config, layouts, files)


_VISION = (lay(("vision_model.model.", "")),)
_PROJECTOR = (lay(("image_to_text_projection.", "")),)
_LM = (lay(("text_model.model.", "model."), ("text_model.lm_head.", "lm_head.")),)

FORMAT = VLMFormat(
    model_types=("kosmos-2",),
    family=MultiFamily("kosmos-2", {
        "vision": Part("vision", _VISION, kinds=frozenset({"vit"})),
        "projector": Part("connector", _PROJECTOR, kinds=frozenset({"latent_queries"})),
        "language": Part("language", _LM, kinds=frozenset({"kosmos2"})),
    }, {"vision": "vision", "connector": "projector", "language": "language"}),
    components={"clip": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="Kosmos2ForConditionalGeneration",
    processor="`Kosmos2Processor`: `CLIPImageProcessor` (resize to the tower's size), `<s><image>`, one placeholder "
              "per latent query, `</image>`, then the text",
    chat_template="none: the processor's layout (`<image>`, the image, `</image>`, `<grounding>`, the text) becomes `prompt`",
)

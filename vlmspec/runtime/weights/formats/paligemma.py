"""PaliGemma (`PaliGemmaForConditionalGeneration`): SigLIP vision tower, one linear projector, Gemma text
model, prefix fusion with a bidirectional prefix (image tokens + prompt), the answer causal.

Image features are spliced in unscaled: transformers scales the token embeddings by sqrt(width)
inside Gemma's embedding (older versions divided the features by sqrt(width) and scaled the whole
sequence, the same numbers), which is what `CausalLM.embed` followed by the splice does. Hugging Face
counts positions from 1; rotary attention depends only on position differences, so that changes nothing.

The export shares BLIP-2's helpers (`formats/blip2.py`): one encoder, connector, LM and prefix fusion, and
a processor that lays the prompt out itself (here: the images, BOS, the text and a newline).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.chat_template import conversation_template
from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    LLAVA_LM,
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.blip2 import (
    HF_IMAGE_TOKEN,
    components,
    image_processor,
    image_token_id,
    prefix_fusion,
    prompt_tail,
)
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.source import CheckpointSource
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session


def _pool_head(vc: dict[str, Any], folder: str) -> bool:
    """Whether the SigLIP tower keeps its (unused) attention-pooling head: the config says so, or, when
    it does not, the checkpoint's keys do (SiglipVisionConfig defaults to a head, PaliGemma's to none)."""
    if "vision_use_head" in vc:
        return bool(vc["vision_use_head"])
    return any(k.endswith("head.probe") and "vision_tower." in k for k in CheckpointSource(folder).keys())


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config["vision_config"], config["text_config"]
    need(tc.get("model_type", "gemma") == "gemma", f"PaliGemma text model `{tc.get('model_type')}` (Gemma 1 only)")
    tc = {"model_type": "gemma", **tc}
    need(vc.get("model_type") == "siglip_vision_model", f"PaliGemma vision tower `{vc.get('model_type')}` "
         "(SigLIP only)")
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    need(act in VISION_ACT, f"vision activation {act}")
    size, patch = vc.get("image_size", 224), vc.get("patch_size", 16)
    need(vc.get("num_channels", 3) == 3, f"{vc.get('num_channels')} image channels")
    vision = [("image_size", size), ("patch_size", patch), ("width", vc.get("hidden_size", 768)),
              ("depth", vc.get("num_hidden_layers", 12)), ("heads", vc.get("num_attention_heads", 12)),
              ("mlp", vc.get("intermediate_size", 3072)), ("act", VISION_ACT[act]),
              ("norm_eps", vc.get("layer_norm_eps", 1e-6)), ("feature", "layer(-1).patches"),
              ("pool_head", _pool_head(vc, folder))]
    # SiglipImageProcessor: a plain resize to the tower's size, mean and std 0.5 unless the folder says otherwise
    vision += [*image_fields(folder, size), ("weights", f"{folder}#vision")]
    width = tc.get("hidden_size", 3072)
    proj_dim = config.get("projection_dim", vc.get("projection_dim", width))
    need(proj_dim == width, f"a projector to {proj_dim} features for a text model of width {width}")
    image_token = int(config.get("image_token_index", config.get("image_token_id", 256000)))
    need(image_token < tc.get("vocab_size", 256000), f"image token {image_token} outside the text vocabulary "
         "(transformers embeds it as id 0)")
    tokens = (size // patch) ** 2
    proj = fields([("weights", f"{folder}#projector")])
    fusion = fields([("tokens", tokens), ("prefix_attention", "bidirectional")])
    return [
        f"  vision siglip = siglip {{\n{fields(vision)}\n  }}",
        f"  connector proj = linear(siglip -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc)),
        f"  fusion prefix(proj -> llm) {{\n{fusion}\n  }}",
    ], image_token


# ------------------------------------------------------------------ export

_NAME = "PaliGemma"
# attributes each config carries; every other attribute must keep its kind's default (see `unplaced_attribute`):
# a SigLIP tower read at its last layer's patches through the post-LayerNorm (`last_hidden_state`)
_SIGLIP = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "norm_eps", "pool_head",
           "mean", "std", "resize", "weights", "dtype"}
_GEMMA = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "max_positions", "norm_eps", "rope_theta",
          "tie_embeddings", "weights", "tokenizer", "dtype"}
#: vlmspec's Gemma activation -> transformers' (whose Gemma reads a plain `gelu` as the tanh one: refused)
_GEMMA_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def claims(ir: ModelIR) -> bool:
    """One linear connector into a prefix fusion: PaliGemma's shape (what does not fit is said by `write`)."""
    return [c.kind for c in ir.by_role("connector")] == ["linear"] and \
        [f.kind for f in ir.by_role("fusion")] == ["prefix"] and not ir.by_role("audio")  # audio: Qwen2-Audio


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, "PaliGemma is one `siglip`, a biased `linear` connector, a `gemma` and a "
                 "bidirectional `prefix` fusion, unquantized, the prompt laid out as its processor lays it")


def _vision(vis: Component, width: int) -> dict[str, Any]:
    v = vis.config
    _fit(vis.kind == "siglip", f"vision `{vis.name}` ({vis.kind})")
    _fit(list(v.feature.layers) in ([-1], [v.depth]) and v.feature.tokens == "patches",
         f"vision `{vis.name}` with feature = {v.feature.to_vlm()} (PaliGemma reads the last layer's patches, "
         "`layer(-1).patches`)")
    refuse_unplaced(vis, _fit, _SIGLIP)
    return {"model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.channels, "hidden_act": ACT_HF[v.act],
            "layer_norm_eps": v.norm_eps, "vision_use_head": v.pool_head, "projection_dim": width}


def _projector(con: Component, vis: Component) -> None:
    """One biased linear layer from the tower's width to the text model's (`multi_modal_projector.linear`)."""
    _fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {', '.join(con.sources)}")
    refuse_unplaced(con, _fit, {"merge", "out", "weights", "dtype"})


def _text(lm: Component, session: Session) -> dict[str, Any]:
    """`text_config`: Gemma 1, attending bidirectionally within the prefix (`token_type_ids` say where)."""
    t = lm.config
    _fit(lm.kind == "gemma", f"language model `{lm.name}` ({lm.kind})")
    _fit(t.act in _GEMMA_ACT, f"language model `{lm.name}` with act = {t.act} (transformers' Gemma reads "
         "`gelu` as the tanh approximation)")
    refuse_unplaced(lm, _fit, _GEMMA | {"act"})
    return {"model_type": "gemma", "vocab_size": t.vocab, "hidden_size": t.width, "intermediate_size": t.ffn,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "num_key_value_heads": t.n_kv,
            "head_dim": t.hd, "max_position_embeddings": t.max_positions, "rms_norm_eps": t.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta}, "hidden_act": _GEMMA_ACT[t.act],
            "attention_bias": False, "use_bidirectional_attention": True, "tie_word_embeddings": t.tie_embeddings,
            **special_token_ids(session)}


# `apply_chat_template`'s text for PaliGemmaProcessor, which puts BOS after the last image placeholder and a
# newline at the end: per question the system text, its images, BOS (the first question's comes from the
# processor), the prompt's text and (before a later turn) its newline; per answer the spec's `answer`, then eos.
_TURN = """{%- if ns.system -%}{{ ns.system ~ '\\n' }}{%- endif -%}
{{- image_token * n_images -}}
{%- if not ns.first -%}{{ bos_token }}{%- endif -%}
{{- middle | replace('{q}', text) -}}
{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}
{%- set ns.first = false -%}"""


def _middle(session: Session) -> str:
    """The prompt's text between BOS and the final newline, which PaliGemmaProcessor adds around it."""
    what = "PaliGemma's processor lays out the images, BOS, the text and a newline"
    tail = prompt_tail(session, _fit, what)
    prompt = session.analysis.ir.settings.prompt
    _fit(tail.endswith("\n"), f"prompt = {json.dumps(prompt)} ({what})")
    return tail[:-1]


def _chat_template(session: Session, middle: str) -> str:
    settings = session.analysis.ir.settings
    return conversation_template("the processor adds BOS after the images and the final newline", _TURN,
                                 {"MIDDLE": middle, "ANSWER": settings.answer, "IMAGE_TOKEN": HF_IMAGE_TOKEN},
                                 system=settings.system or None)


def write(session: Session) -> Export:
    """The PaliGemma checkpoint of a PaliGemma-shaped model, in the layout transformers saves
    (`vision_tower.`, `multi_modal_projector.`, `language_model.model.` / `language_model.lm_head.`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = components(ir, _fit)
    text = _text(lm, session)
    _projector(con, vis)
    prefix_fusion(fus, con, _fit, "bidirectional", session.tokenizer)
    image_id = image_token_id(session, _fit)
    _fit(image_id < lm.config.vocab, f"image token id {image_id} outside the vocabulary of {lm.config.vocab}")
    tokens = (vis.config.image_size // vis.config.patch_size) ** 2
    config = {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
              "vision_config": _vision(vis, lm.config.width), "text_config": text, "image_token_index": image_id,
              "projection_dim": lm.config.width, "hidden_size": lm.config.width, "vocab_size": lm.config.vocab,
              "tie_word_embeddings": lm.config.tie_embeddings}
    layouts = {vis.name: lay(("vision_tower.", "")), con.name: lay(("multi_modal_projector.", "")),
               lm.name: LLAVA_LM[0]}
    if session.tokenizer is None:  # no processor without a tokenizer: the exporter writes weights and config
        return Export(config, layouts)
    middle = _middle(session)
    image = {**image_processor(vis, "PaliGemmaProcessor", "SiglipImageProcessor"), "image_seq_length": tokens}
    files = {"preprocessor_config.json": image, "processor_config.json": {"processor_class": "PaliGemmaProcessor"}}
    return Export(config, layouts, files, chat_template=_chat_template(session, middle))


FORMAT = VLMFormat(
    model_types=("paligemma",),
    family=MultiFamily("paligemma", {
        "vision": Part("vision", (lay(("model.vision_tower.vision_model.", "")), lay(("model.vision_tower.", "")),
                                  lay(("vision_tower.vision_model.", "")), lay(("vision_tower.", ""))),
                       sub_config="vision_config"),
        "projector": Part("connector", (lay(("model.multi_modal_projector.", "")),
                                        lay(("multi_modal_projector.", ""))), kinds=frozenset({"linear"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "projector", "language": "language"}),
    components={"siglip": "vision", "proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="PaliGemmaForConditionalGeneration",
    processor='`PaliGemmaProcessor`: `SiglipImageProcessor` (plain resize)',
    chat_template="none in the folder: the processor's layout (images, BOS, text, newline) becomes `prompt`; exported as a template that lays it out",
)

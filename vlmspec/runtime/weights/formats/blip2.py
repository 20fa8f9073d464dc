"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`):
EVA vision tower, Q-Former (with instruction input for InstructBLIP), OPT / Llama text model, or for BLIP-2 a
T5 / Flan-T5 encoder-decoder (`t5`), whose processor ends the text with EOS instead of starting it with BOS
(`prompt = "{image}{q}</s>"`, the encoder's input; `answer = "{a}"`, the decoder's).

Both processors lay the prompt out themselves: one image placeholder per query, then the tokenized text
(its BOS after the placeholders); InstructBLIP's also gives the text to the Q-Former in its own (BERT)
vocabulary. `vlm import-hf` writes that as `prompt = "{image}<s>{q}"`, and `vlm export-hf` writes a spec
back only when its prompt is laid out so (see `write`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.chat_template import conversation_template
from vlmspec.runtime.weights.errors import EXPORT, weights_error
from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    LLAVA_LM,
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_fields
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, qc, tc = config["vision_config"], config["qformer_config"], config["text_config"]
    instruct = config.get("model_type") == "instructblip"
    t5 = tc.get("model_type") == "t5"
    need(config.get("use_decoder_only_language_model", True) or t5,
         f"an encoder-decoder language model `{tc.get('model_type')}` (of those, only t5 is supported)")
    act = vc.get("hidden_act", "gelu")
    need(act in VISION_ACT and qc.get("hidden_act", "gelu") == "gelu", f"vision activation {act}")
    need(vc.get("qkv_bias", True), "an EVA tower without q/v biases")
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", VISION_ACT[act]), ("norm_eps", vc.get("layer_norm_eps", 1e-6)),
              ("feature", "layer(-1).all")]
    # BlipImageProcessor (preprocessor_config.json / processor_config.json): resize, mean, std (a plain resize)
    vision += [*image_fields(folder, vc["image_size"]), ("weights", f"{folder}#vision")]
    nq = config["num_query_tokens"]
    qf: list[tuple[str, Any]] = [
        ("queries", nq), ("width", qc["hidden_size"]), ("depth", qc["num_hidden_layers"]),
        ("heads", qc["num_attention_heads"]), ("mlp", qc["intermediate_size"]),
        ("cross_every", qc.get("cross_attention_frequency", 2)), ("norm_eps", qc.get("layer_norm_eps", 1e-12))]
    if instruct:
        qf += [("instruction", True), ("text_vocab", qc["vocab_size"]), ("max_text", qc["max_position_embeddings"])]
    else:
        qf.append(("text_ffn", False))
    qf += [("project", True), ("weights", f"{folder}#qformer")]
    return [
        f"  vision eva = eva {{\n{fields(vision)}\n  }}",
        f"  connector qf = qformer(eva -> llm) {{\n{fields(qf)}\n  }}",
        t5_block(tc, f"{folder}#language") if t5 else language_block(tc, f"{folder}#language", tie(config, tc)),
        f"  fusion prefix(qf -> llm) {{\n{fields([('tokens', nq)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 0)) or 0)


# ------------------------------------------------------------------ T5 (BLIP-2 Flan-T5)

#: transformers' T5 activations (`feed_forward_proj = "gated-gelu"` means `gelu_new`, the tanh approximation)
T5_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}
#: BLIP-2 keeps its T5 whole under `language_model.` (`shared`, `encoder.*`, `decoder.*`, `lm_head`), as a T5
#: folder keeps it at the top level: the component's keys are T5's own
T5_LM = (lay(("language_model.", "")),)


def t5_block(tc: dict[str, Any], weights: str) -> str:
    """The `language llm = t5 { }` block of a T5 text config; T5Config's defaults where it leaves a field out.
    transformers ties every T5's head to its embedding unless the checkpoint holds a head of its own, and
    scales the decoder's output by d_model ** -0.5 unless the config says `tie_word_embeddings = false` (saved
    as `scale_decoder_outputs`): a spec's `tie_embeddings` is the scaled, tied T5 v1.0 and the unscaled,
    untied T5 v1.1 / Flan-T5."""
    proj = str(tc.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    need(len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), f"T5 feed_forward_proj `{proj}`")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    need(act in T5_ACT, f"T5 activation {act}")
    scaled = tc.get("scale_decoder_outputs", tc.get("tie_word_embeddings", True) is not False)
    depth = tc.get("num_layers", 6)
    pairs: list[tuple[str, Any]] = [("width", tc.get("d_model", 512)), ("depth", depth)]
    dec = tc.get("num_decoder_layers") or depth
    if dec != depth:
        pairs.append(("decoder_depth", dec))
    pairs += [("heads", tc.get("num_heads", 8)), ("head_dim", tc.get("d_kv", 64)), ("ffn", tc.get("d_ff", 2048)),
              ("gated", len(parts) == 2), ("act", T5_ACT[act]),
              ("buckets", tc.get("relative_attention_num_buckets", 32)),
              ("max_distance", tc.get("relative_attention_max_distance", 128)), ("vocab", tc.get("vocab_size", 32128)),
              ("norm_eps", float(tc.get("layer_norm_epsilon", 1e-6))), ("tie_embeddings", bool(scaled))]
    start = tc.get("decoder_start_token_id", tc.get("pad_token_id", 0))
    if start not in (None, 0):
        pairs.append(("decoder_start", int(start)))
    pairs.append(("weights", weights))
    return f"  language llm = t5 {{\n{fields(pairs)}\n  }}"


def t5_prompt(tokenizer: Any) -> tuple[str, str, str]:
    """BLIP-2 Flan-T5's processor layout: the image placeholders, then the tokenized text, which a T5
    tokenizer ends with EOS (no BOS): `{image}{q}</s>`, the encoder's input."""
    eos = tokenizer.eos_token
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    need(isinstance(eos, str) and bool(eos) and tokenizer("a")["input_ids"] == [*plain, tokenizer.eos_token_id],
         "a BLIP-2 T5 tokenizer that does not add just EOS after the text")
    return ("{image}{q}" + eos, "{a}", "# Prompt: the processor's layout (one image placeholder per query, then the "
            "tokenized text with its EOS), the encoder's input; the folder has no chat template.")


def _family(mt: str) -> MultiFamily:
    qformer = (lay(("query_tokens", "query_tokens"), ("qformer.", "qformer."),
                   ("language_projection.", "language_projection.")),)
    return MultiFamily(mt, {
        "vision": Part("vision", (lay(("model.vision_model.", "")), lay(("vision_model.", ""))),
                       sub_config="vision_config"),
        "qformer": Part("connector", qformer, kinds=frozenset({"qformer"})),
        # OPT / Llama under `language_model.model.` (or `model.language_model.`); a T5 under `language_model.`
        "language": Part("language", LLAVA_LM + T5_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "qformer", "language": "language"})


# ------------------------------------------------------------------ export

#: the image placeholder the BLIP-2, InstructBLIP and PaliGemma processors use when the tokenizer names none
HF_IMAGE_TOKEN = "<image>"
#: vlmspec's resize filter -> PIL's code, as the image processors store it
RESAMPLE_CODE = {name: code for code, name in RESAMPLE.items()}
#: E0586 unless the condition holds: (condition, what of the spec does not fit)
Fit = Callable[[bool, str], None]

# attributes each config below carries; every other attribute must keep its kind's default (or the value
# `fixed` names), see `unplaced_attribute`
_EVA = {"image_size", "patch_size", "width", "depth", "heads", "mlp", "act", "norm_eps", "feature", "mean", "std",
        "resize", "weights", "dtype"}
# `merge` has one source to merge, `out` is the LM's width (the compiler checks), `embed_dim` serves `pretrain`
_QFORMER = {"queries", "width", "depth", "heads", "mlp", "cross_every", "norm_eps", "text_vocab", "max_text", "merge",
            "out", "embed_dim", "weights", "dtype"}
_LM = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "max_positions", "tie_embeddings",
       "weights", "tokenizer", "dtype"}
# OPT: learned positions, so `rope_theta` is never read; `kv_heads` / `head_dim` are checked to be OPT's own
_OPT = _LM | {"embed_dim", "act", "rope_theta"}
_LLAMA = _LM | {"norm_eps", "rope_theta", "qkv_bias"}


@dataclass(frozen=True, slots=True)
class BlipFormat:
    """What BLIP-2 and InstructBLIP write differently: names, and whether the Q-Former reads the instruction."""

    name: str  # for messages
    model_type: str
    architecture: str
    processor: str
    vision_type: str
    qformer_type: str
    instruct: bool

    def fit(self, cond: bool, what: str) -> None:
        does_not_fit(cond, self.name, what, f"{self.name} is one `eva`, a `qformer` "
                     f"{'with' if self.instruct else 'without'} `instruction`, an `opt`, `llama` or `t5` and a causal "
                     "`prefix` fusion, unquantized, the prompt laid out as its processor lays it")


BLIP2 = BlipFormat("BLIP-2", "blip-2", "Blip2ForConditionalGeneration", "Blip2Processor", "blip_2_vision_model",
                   "blip_2_qformer", instruct=False)
INSTRUCTBLIP = BlipFormat("InstructBLIP", "instructblip", "InstructBlipForConditionalGeneration",
                          "InstructBlipProcessor", "instructblip_vision_model", "instructblip_qformer", instruct=True)


def _claims(ir: ModelIR, instruct: bool) -> bool:
    """A Q-Former into a prefix fusion, reading the instruction or not: BLIP-2's or InstructBLIP's shape."""
    connectors = ir.by_role("connector")
    return [c.kind for c in connectors] == ["qformer"] and [f.kind for f in ir.by_role("fusion")] == ["prefix"] \
        and bool(getattr(connectors[0].config, "instruction", False)) == instruct


def claims_blip2(ir: ModelIR) -> bool:
    return _claims(ir, instruct=False)


def claims_instructblip(ir: ModelIR) -> bool:
    return _claims(ir, instruct=True)


def components(ir: ModelIR, fit: Fit) -> tuple[Component, Component, Component, Component]:
    """(vision, connector, language, fusion): a BLIP-2, InstructBLIP or PaliGemma model has one of each."""
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    fit(len(ir.components) == 4 and all(len(v) == 1 for v in by.values()),
        "a model with other than one encoder, connector, language model and fusion")
    return by["vision"][0], by["connector"][0], by["language"][0], by["fusion"][0]



def _vision(vis: Component, fmt: BlipFormat) -> dict[str, Any]:
    """`vision_config`: an EVA tower whose last layer's tokens (class token and post-LayerNorm included)
    the Q-Former reads, as `Blip2VisionModel`'s `last_hidden_state`."""
    v = vis.config
    fmt.fit(vis.kind == "eva", f"vision `{vis.name}` ({vis.kind})")
    fmt.fit(list(v.feature.layers) in ([-1], [v.depth]) and v.feature.tokens == "all",
            f"vision `{vis.name}` with feature = {v.feature.to_vlm()} (the Q-Former reads the last layer's tokens, "
            "`layer(-1).all`)")
    refuse_unplaced(vis, fmt.fit, _EVA)
    return {"model_type": fmt.vision_type, "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": ACT_HF[v.act], "layer_norm_eps": v.norm_eps, "qkv_bias": True}


def _qformer(con: Component, vis: Component, fmt: BlipFormat) -> dict[str, Any]:
    """`qformer_config`: BLIP-2's Q-Former keeps a text feed-forward only with `use_qformer_text_input`;
    InstructBLIP's always has one, and the instruction embeddings."""
    c = con.config
    fmt.fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {', '.join(con.sources)}")
    carried = _QFORMER if fmt.instruct else _QFORMER | {"text_ffn"}
    refuse_unplaced(con, fmt.fit, carried, {"instruction": fmt.instruct, "text_ffn": True})
    out = {"model_type": fmt.qformer_type, "vocab_size": c.text_vocab, "hidden_size": c.width,
           "num_hidden_layers": c.depth, "num_attention_heads": c.heads, "intermediate_size": c.mlp,
           "hidden_act": "gelu", "max_position_embeddings": c.max_text, "layer_norm_eps": c.norm_eps,
           "cross_attention_frequency": c.cross_every, "encoder_hidden_size": vis.config.width}
    if not fmt.instruct:
        out["use_qformer_text_input"] = c.text_ffn
    return out


def _opt(lm: Component, fit: Fit) -> dict[str, Any]:
    t = lm.config
    fit(t.n_kv == t.heads and t.hd * t.heads == t.width,
        f"language model `{lm.name}` with kv_heads = {t.n_kv}, head_dim = {t.hd} (OPT's heads split its width)")
    refuse_unplaced(lm, fit, _OPT)
    return {"model_type": "opt", "vocab_size": t.vocab, "hidden_size": t.width, "num_hidden_layers": t.depth,
            "ffn_dim": t.ffn, "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions,
            "word_embed_proj_dim": t.embed_dim or t.width, "activation_function": t.act,
            "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
            "tie_word_embeddings": t.tie_embeddings}


def _llama(lm: Component, fit: Fit) -> dict[str, Any]:
    """Llama (Vicuna), or Qwen2 for one with q/k/v biases."""
    t = lm.config
    refuse_unplaced(lm, fit, _LLAMA)
    text = {"model_type": "qwen2" if t.qkv_bias else "llama", "vocab_size": t.vocab, "hidden_size": t.width,
            "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "num_key_value_heads": t.n_kv, "head_dim": t.hd, "max_position_embeddings": t.max_positions,
            "rms_norm_eps": t.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "hidden_act": "silu", "tie_word_embeddings": t.tie_embeddings}
    if not t.qkv_bias:
        text.update(attention_bias=False, mlp_bias=False)
    return text


# T5: `max_positions` only bounds the inputs vlmspec accepts (transformers' T5 sets no limit of its own)
_T5 = {"width", "depth", "decoder_depth", "heads", "head_dim", "ffn", "gated", "act", "buckets", "max_distance",
       "vocab", "norm_eps", "tie_embeddings", "decoder_start", "max_positions", "weights", "tokenizer", "dtype"}
#: (gated, act) -> transformers' `feed_forward_proj` (its `gated-gelu` is the tanh approximation, `gelu_new`)
_T5_PROJ = {(True, "gelu_tanh"): "gated-gelu", (True, "relu"): "gated-relu", (True, "silu"): "gated-silu",
            (False, "relu"): "relu", (False, "gelu"): "gelu", (False, "gelu_tanh"): "gelu_new", (False, "silu"): "silu"}


def _t5(lm: Component, fit: Fit) -> dict[str, Any]:
    """A T5 text config; `tie_word_embeddings` is what transformers reads as `scale_decoder_outputs` (a tied
    head is stored once and tied again on load, an untied one is a tensor of its own)."""
    t = lm.config
    proj = _T5_PROJ.get((t.gated, t.act))
    fit(proj is not None, f"language model `{lm.name}` with gated = true, act = {t.act} (transformers' gated T5 "
        "FFN reads `gelu` as the tanh approximation, `gelu_tanh`)")
    refuse_unplaced(lm, fit, _T5)
    return {"model_type": "t5", "vocab_size": t.vocab, "d_model": t.width, "d_kv": t.head_dim, "d_ff": t.ffn,
            "num_layers": t.depth, "num_decoder_layers": t.n_dec, "num_heads": t.heads, "feed_forward_proj": proj,
            "relative_attention_num_buckets": t.buckets, "relative_attention_max_distance": t.max_distance,
            "layer_norm_epsilon": t.norm_eps, "tie_word_embeddings": t.tie_embeddings,
            "decoder_start_token_id": t.decoder_start, "is_encoder_decoder": True}


def _text(lm: Component, session: Session, fit: Fit) -> dict[str, Any]:
    """`text_config`, with the tokenizer's ids: BLIP's `generate` runs the language model's own generation
    config, made from this one."""
    fit(lm.kind in ("opt", "llama", "t5"), f"language model `{lm.name}` ({lm.kind})")
    text = _opt(lm, fit) if lm.kind == "opt" else _t5(lm, fit) if lm.kind == "t5" else _llama(lm, fit)
    return {**text, **special_token_ids(session)}


def prefix_fusion(fus: Component, con: Component, fit: Fit, attention: str, tokenizer: Any) -> None:
    """A prefix fusion of the connector's tokens with the processors' own placeholder (`<image>`, unless the
    tokenizer names another, which they then use) and the format's attention within the prompt."""
    fit(fus.kind == "prefix" and list(fus.sources) == [con.name], f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, fit, {"tokens"}, {"prefix_attention": attention, "image_token": HF_IMAGE_TOKEN})
    named = getattr(tokenizer, "image_token", None)
    fit(named in (None, HF_IMAGE_TOKEN), f"a tokenizer whose image_token is `{named}` (the fusion's is "
        f"`{HF_IMAGE_TOKEN}`)")


def adds_just_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS, and nothing else, in front of a text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"] == [bos, *plain]


def prompt_tail(session: Session, fit: Fit, what: str) -> str:
    """What the spec's prompt lays out after the image placeholders and BOS (`{q}` for an imported one):
    these processors put the placeholders first, BOS after them. No spec `chat_template`: the processor,
    not a template, lays the prompt out."""
    settings, bos = session.analysis.ir.settings, session.tokenizer.bos_token
    fit(settings.chat_template is None, f"a spec `chat_template` ({what})")
    prompt = settings.prompt if "{image}" in settings.prompt else "{image}" + settings.prompt
    head = "{image}" + (bos or "")
    fit(bool(bos) and prompt.startswith(head) and "{image}" not in prompt[len(head):],
        f"prompt = {json.dumps(settings.prompt)} ({what})")
    return prompt[len(head):]


def _laid_out(session: Session, fmt: BlipFormat) -> str:
    """The prompt after the placeholders and BOS, refused where the processor lays prompts out otherwise."""
    what = "the processor puts the image placeholders first, then the tokenized text with its BOS"
    tail = prompt_tail(session, fmt.fit, what)
    fmt.fit(not session.analysis.ir.settings.system, f"`system` ({what})")
    fmt.fit(adds_just_bos(session.tokenizer), f"a tokenizer that does not add just BOS in front of a text ({what})")
    # the Q-Former reads the very text the language model reads: the question alone, as vlmspec gives it
    fmt.fit(not fmt.instruct or tail == "{q}", f"prompt = {json.dumps(session.analysis.ir.settings.prompt)} "
            f"(InstructBLIP's processor gives the Q-Former the language model's text: only `{{image}}BOS{{q}}` "
            "gives it the question alone)")
    return tail


def _t5_laid_out(session: Session, fmt: BlipFormat) -> str:
    """The prompt after the placeholders, ending with EOS (BLIP-2 Flan-T5's processor tokenizes the text with
    EOS after it and no BOS), refused where the processor lays prompts out otherwise."""
    settings, tok = session.analysis.ir.settings, session.tokenizer
    what = "the processor puts the image placeholders first, then the tokenized text with its EOS"
    fmt.fit(settings.chat_template is None, f"a spec `chat_template` ({what})")
    fmt.fit(not settings.system, f"`system` ({what})")
    fmt.fit(not fmt.instruct, "an InstructBLIP with a t5 language model (exported as BLIP-2 only)")
    eos = tok.eos_token
    plain = tok("a", add_special_tokens=False)["input_ids"]
    fmt.fit(bool(eos) and tok.bos_token is None and tok("a")["input_ids"] == [*plain, tok.eos_token_id],
            f"a tokenizer that does not add just EOS after a text ({what})")
    prompt = settings.prompt if "{image}" in settings.prompt else "{image}" + settings.prompt
    fmt.fit(prompt.startswith("{image}") and prompt.endswith(eos) and "{image}" not in prompt[len("{image}"):],
            f"prompt = {json.dumps(settings.prompt)} ({what})")
    return prompt[len("{image}"):]


# A user turn of BLIP-2 Flan-T5: the prompt's tail (its EOS written out) after earlier turns; the last one
# without its EOS, which the tokenizer adds after the whole text
_T5_TURN = """{{- (tail[:-(eos_token | length)] if loop.last else tail) | replace('{q}', text) -}}"""


def _t5_chat_template(session: Session, tail: str) -> str:
    return conversation_template("the processor puts the image placeholders first and EOS last", _T5_TURN,
                                 {"TAIL": tail, "ANSWER": session.analysis.ir.settings.answer})


# `apply_chat_template`'s text for the BLIP processors, which put the image placeholders in front of it and
# tokenize it with BOS (the first question without one: the tokenizer adds it); later questions carry the
# prompt's BOS as vlmspec's `Processor` lays them out, and each answer ends with eos. A system message has
# no place (the placeholders come first).
_BLIP_TURN = """{{- (first if ns.first else later) | replace('{q}', text) -}}
{%- set ns.first = false -%}"""


def _chat_template(session: Session, tail: str) -> str:
    bos = session.tokenizer.bos_token
    return conversation_template("the processor puts the image placeholders first", _BLIP_TURN,
                                 {"FIRST": tail, "LATER": bos + tail, "ANSWER": session.analysis.ir.settings.answer})


def image_processor(vis: Component, processor: str, image_type: str) -> dict[str, Any]:
    """`preprocessor_config.json`: a plain resize to the encoder's square size with its filter (the only
    `fit` these processors have), then rescale and normalise with its mean and std."""
    v = vis.config
    s = v.image_size
    return {"image_processor_type": image_type, "processor_class": processor, "do_resize": True,
            "size": {"height": s, "width": s}, "resample": RESAMPLE_CODE[v.resize], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std),
            "do_convert_rgb": True}


def _instruction_tokenizer(session: Session) -> Path:
    """The built folder's `qformer_tokenizer/`, which InstructBlipProcessor loads beside the tokenizer."""
    tok = session.instruction_tokenizer
    folder = Path(getattr(tok, "name_or_path", "") or "") if tok is not None else None
    if folder is None or not folder.is_dir():
        raise weights_error(EXPORT, "export-hf: the model folder has no `qformer_tokenizer/` (the Q-Former's "
                            "tokenizer InstructBLIP's processor needs)",
                            help="build the model from a checkpoint folder that has one, or save the Q-Former's "
                            "tokenizer into MODEL_DIR/qformer_tokenizer")
    return folder


def image_token_id(session: Session, fit: Fit) -> int:
    """The placeholder's id, which the config names (a model built without a tokenizer has none)."""
    image_id = getattr(session.model, "image_token_id", None)
    fit(image_id is not None, "a model without an image token id (built without a tokenizer)")
    return int(image_id)


def _write(session: Session, fmt: BlipFormat) -> Export:
    """The checkpoint of a BLIP-shaped model, in the layout transformers saves (`vision_model.`,
    `query_tokens` / `qformer.` / `language_projection.`, `language_model.model.` / `language_model.lm_head.`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = components(ir, fmt.fit)
    config = {"model_type": fmt.model_type, "architectures": [fmt.architecture],
              "vision_config": _vision(vis, fmt), "qformer_config": _qformer(con, vis, fmt),
              "text_config": _text(lm, session, fmt.fit), "num_query_tokens": con.config.queries,
              "image_token_index": image_token_id(session, fmt.fit), "use_decoder_only_language_model": lm.kind != "t5",
              "tie_word_embeddings": lm.config.tie_embeddings}
    prefix_fusion(fus, con, fmt.fit, "causal", session.tokenizer)
    layouts = {vis.name: lay(("vision_model.", "")), con.name: _family(fmt.model_type).parts["qformer"].layouts[0],
               lm.name: T5_LM[0] if lm.kind == "t5" else LLAVA_LM[0]}
    if session.tokenizer is None:  # no processor without a tokenizer: the exporter writes weights and config
        return Export(config, layouts)
    if lm.kind == "t5":
        files = {"preprocessor_config.json": image_processor(vis, fmt.processor, "BlipImageProcessor"),
                 "processor_config.json": {"processor_class": fmt.processor, "num_query_tokens": con.config.queries}}
        return Export(config, layouts, files, {}, _t5_chat_template(session, _t5_laid_out(session, fmt)))
    tail = _laid_out(session, fmt)
    files = {"preprocessor_config.json": image_processor(vis, fmt.processor, "BlipImageProcessor"),
             "processor_config.json": {"processor_class": fmt.processor, "num_query_tokens": con.config.queries}}
    copies = {"qformer_tokenizer": _instruction_tokenizer(session)} if fmt.instruct else {}
    return Export(config, layouts, files, copies, _chat_template(session, tail))


def write_blip2(session: Session) -> Export:
    return _write(session, BLIP2)


def write_instructblip(session: Session) -> Export:
    return _write(session, INSTRUCTBLIP)


_COMPONENTS = {"eva": "vision", "qf": "qformer", "llm": "language"}
_TEMPLATE_NOTE = ("none in the folder: the processor's layout (images, then BOS and text) becomes `prompt`; exported as a template that lays it out")
_BLIP2_NOTE = ("none in the folder: the processor's layout (images, then BOS and text; with a T5 text model images, "
               "text and EOS, the encoder's input) becomes `prompt`; exported as a template that lays it out")
FORMATS = (VLMFormat(("blip-2",), _family("blip-2"), _COMPONENTS, read, claims=claims_blip2, write=write_blip2,
                     hf_class=BLIP2.architecture, processor="`Blip2Processor`: `BlipImageProcessor` (plain resize)",
                     chat_template=_BLIP2_NOTE),
           VLMFormat(("instructblip",), _family("instructblip"), _COMPONENTS, read, claims=claims_instructblip,
                     write=write_instructblip, hf_class=INSTRUCTBLIP.architecture,
                     processor="`InstructBlipProcessor`: `BlipImageProcessor` (plain resize), the Q-Former's tokenizer "
                               "in `qformer_tokenizer/`", chat_template=_TEMPLATE_NOTE))

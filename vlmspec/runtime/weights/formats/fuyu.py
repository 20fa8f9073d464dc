"""Fuyu (`FuyuForCausalLM`): no image encoder. The image processor fits each image into a canvas (scaled
down only when larger, aspect ratio kept), pads it to whole patches and flattens every patch; one biased
linear layer (`vision_embed_tokens`) projects the patches into a Persimmon decoder. The processor writes one
`|SPEAKER|` placeholder per patch and `|NEWLINE|` after each row, then `<s>`, the text and `<0x04>`.

In a spec: `vision img = patches { layout = rows(...) }`, `connector proj = linear(img -> llm)`,
`language llm = persimmon`, `fusion prefix(proj -> llm)` and `prompt = "{image}<s>{q}<0x04>"`.
"""

from __future__ import annotations

import json
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
from vlmspec.runtime.weights.formats.blip2 import components, image_token_id
from vlmspec.runtime.weights.hf_folder import RESAMPLE, folder_tokenizer, image_processor
from vlmspec.runtime.weights.spec_text import Raw, fields, need, rope_theta, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

#: what FuyuProcessor writes (fixed strings in transformers, not read from the folder)
IMAGE_TOKEN, NEWLINE, BOS, BOA = "|SPEAKER|", "|NEWLINE|", "<s>", "<0x04>"
PROMPT = "{image}" + BOS + "{q}" + BOA

#: FuyuImageProcessor's defaults where the folder's preprocessor_config.json says nothing
_CANVAS, _PATCH, _PAD = {"height": 1080, "width": 1920}, {"height": 30, "width": 30}, 1.0

_TEXT_DEFAULTS = {"vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 36,
                  "num_attention_heads": 64, "max_position_embeddings": 16384, "layer_norm_eps": 1e-5,
                  "hidden_act": "relu2", "qk_layernorm": True}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Persimmon config: `text_config`, or (adept/fuyu-8b's flat config.json) the top-level keys."""
    tc = config.get("text_config")
    if not isinstance(tc, dict):
        tc = {k: v for k, v in config.items() if k != "model_type"}
    return {**_TEXT_DEFAULTS, **tc}


def _partial_rotary(tc: dict[str, Any]) -> float:
    rp = tc.get("rope_parameters") or {}
    return float(rp.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.5)))


def persimmon_block(tc: dict[str, Any], weights: str, tied: bool) -> str:
    """`language llm = persimmon { }` of a Persimmon text config."""
    need(tc.get("model_type", "persimmon") == "persimmon", f"Fuyu text model `{tc.get('model_type')}` "
         "(Persimmon only)")
    act = tc.get("hidden_act", "relu2")
    need(act in ("relu2", "relu", "gelu"), f"Persimmon activation {act}")
    need(not tied, "a Persimmon with tied embeddings (Fuyu's head is its own)")
    pairs = [("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", tc["num_attention_heads"]),
             ("ffn", tc["intermediate_size"]), ("vocab", tc["vocab_size"]),
             ("max_positions", tc["max_position_embeddings"]), ("rope_theta", rope_theta(tc)),
             ("partial_rotary", _partial_rotary(tc)), ("qk_norm", bool(tc.get("qk_layernorm", True))),
             ("norm_eps", tc.get("layer_norm_eps", 1e-5)), ("act", act), ("weights", weights)]
    return f"  language llm = persimmon {{\n{fields(pairs)}\n  }}"


def _side(d: Any, default: dict[str, int], what: str) -> tuple[int, int]:
    d = d if isinstance(d, dict) else default
    need("height" in d and "width" in d, f"a Fuyu processor {what} without height and width")
    return int(d["height"]), int(d["width"])


def _vision_fields(config: dict[str, Any], folder: str) -> list[tuple[str, Any]]:
    """The `patches` block from config.json and FuyuImageProcessor's settings."""
    pre = image_processor(folder)
    patch = int(config.get("patch_size", 30))
    ph, pw = _side(pre.get("patch_size"), {"height": patch, "width": patch}, "patch_size")
    need(ph == pw == patch, f"processor patches of {ph} x {pw} for a model of {patch} x {patch} patches")
    need(int(config.get("num_channels", 3)) == 3, f"{config.get('num_channels')} image channels")
    need(pre.get("do_resize", True) and pre.get("do_pad", True), "a Fuyu processor that does not resize or pad")
    need(pre.get("do_rescale", True) and abs(float(pre.get("rescale_factor", 1 / 255)) * 255 - 1) < 1e-6,
         "a Fuyu processor that does not rescale by 1/255")
    need(pre.get("do_normalize", True), "a Fuyu processor that does not normalise")
    pad = float(pre.get("padding_value", _PAD))
    need(pad == int(pad) and 0 <= pad <= 255, f"padding_value {pad} (vlmspec pads with an 8-bit pixel value)")
    mean, std = pre.get("image_mean", 0.5), pre.get("image_std", 0.5)
    mean = [float(mean)] * 3 if not isinstance(mean, list) else [float(m) for m in mean]
    std = [float(std)] * 3 if not isinstance(std, list) else [float(s) for s in std]
    resample = pre.get("resample", 2)
    need(resample in RESAMPLE, f"processor resample filter {resample}")
    h, w = _side(pre.get("size"), _CANVAS, "size")
    layout = Raw(f"rows(canvas = [{h}, {w}], newline_token = {quote(NEWLINE)})")
    return [("patch_size", patch), ("layout", layout), ("mean", Raw(json.dumps(mean))),
            ("std", Raw(json.dumps(std))), ("resize", RESAMPLE[resample]), ("pad_value", int(pad))]


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    tc = _text_config(config)
    image_token = int(config.get("image_token_id", 71011))
    need(image_token < tc["vocab_size"], f"image token {image_token} outside the vocabulary of {tc['vocab_size']}")
    tok = folder_tokenizer(folder)
    if tok is not None:
        vocab = tok.get_vocab()
        need(IMAGE_TOKEN in vocab and NEWLINE in vocab, f"a tokenizer without FuyuProcessor's `{IMAGE_TOKEN}` and "
             f"`{NEWLINE}` tokens")
        need(vocab[IMAGE_TOKEN] == image_token, f"a tokenizer whose `{IMAGE_TOKEN}` is id {vocab[IMAGE_TOKEN]}, "
             f"not the config's image_token_id {image_token}")
        need(tok.bos_token in (None, BOS), f"a tokenizer whose BOS is `{tok.bos_token}` (FuyuProcessor writes "
             f"`{BOS}` after the image)")
    proj = fields([("weights", f"{folder}#projector")])
    fusion = fields([("image_token", IMAGE_TOKEN)])
    return [
        f"  vision img = patches {{\n{fields(_vision_fields(config, folder))}\n  }}",
        f"  connector proj = linear(img -> llm) {{\n{proj}\n  }}",
        persimmon_block(tc, f"{folder}#language", tie(config, tc)),
        f"  fusion prefix(proj -> llm) {{\n{fusion}\n  }}",
        f"  prompt = {quote(PROMPT)}",
    ], image_token


# ------------------------------------------------------------------ export

_NAME = "Fuyu"
_PERSIMMON = {"width", "depth", "heads", "ffn", "vocab", "max_positions", "rope_theta", "partial_rotary", "qk_norm",
              "norm_eps", "act", "weights", "tokenizer", "dtype"}
_PATCHES = {"patch_size", "layout", "mean", "std", "resize", "pad_value", "dtype"}
_ACT_HF = {"relu2": "relu2", "relu": "relu", "gelu": "gelu"}


def claims(ir: ModelIR) -> bool:
    """A `patches` input: Fuyu's shape (what does not fit is said by `write`)."""
    return [c.kind for c in ir.by_role("vision")] == ["patches"]


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, "Fuyu is one `patches` input with `rows(...)`, a biased `linear` connector, "
                 f"a `persimmon` and a `prefix` fusion on `{IMAGE_TOKEN}`, unquantized, with prompt = "
                 f"{json.dumps(PROMPT)}")


def _vision(vis: Component) -> dict[str, Any]:
    v = vis.config
    _fit(vis.kind == "patches", f"vision `{vis.name}` ({vis.kind})")
    _fit(v.layout.newline_token == NEWLINE, f"layout newline `{v.layout.newline_token}` (FuyuProcessor writes `{NEWLINE}`)")
    refuse_unplaced(vis, _fit, _PATCHES)
    h, w = v.layout.canvas
    inverse = {name: code for code, name in RESAMPLE.items()}
    return {"image_processor_type": "FuyuImageProcessor", "processor_class": "FuyuProcessor", "do_resize": True,
            "size": {"height": h, "width": w}, "resample": inverse[v.resize], "do_pad": True, "padding_mode": "constant",
            "padding_value": float(v.pad_value), "do_normalize": True, "image_mean": list(v.mean),
            "image_std": list(v.std), "do_rescale": True, "rescale_factor": 1 / 255,
            "patch_size": {"height": v.patch_size, "width": v.patch_size}}


def _text(lm: Component, session: Session) -> dict[str, Any]:
    t = lm.config
    _fit(lm.kind == "persimmon", f"language model `{lm.name}` ({lm.kind})")
    refuse_unplaced(lm, _fit, _PERSIMMON)
    return {"model_type": "persimmon", "vocab_size": t.vocab, "hidden_size": t.width, "intermediate_size": t.ffn,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "hidden_act": _ACT_HF[t.act],
            "max_position_embeddings": t.max_positions, "layer_norm_eps": t.norm_eps, "qk_layernorm": t.qk_norm,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "partial_rotary_factor": t.partial_rotary},
            "tie_word_embeddings": False, **special_token_ids(session)}


def write(session: Session) -> Export:
    """The Fuyu checkpoint of a Fuyu-shaped model, in the layout `save_pretrained` writes
    (`vision_embed_tokens.`, `language_model.model.`, `language_model.lm_head.`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = components(ir, _fit)
    text = _text(lm, session)
    image = _vision(vis)
    _fit(list(con.sources) == [vis.name] and con.kind == "linear", f"connector `{con.name}` ({con.kind})")
    refuse_unplaced(con, _fit, {"merge", "out", "weights", "dtype"})
    _fit(fus.kind == "prefix" and list(fus.sources) == [con.name], f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, _fit, {"tokens"}, {"image_token": IMAGE_TOKEN})
    image_id = image_token_id(session, _fit)
    settings = ir.settings
    _fit(settings.chat_template is None and not settings.system and settings.prompt == PROMPT,
         f"prompt = {json.dumps(settings.prompt)} (FuyuProcessor lays out the image, `{BOS}`, the text, `{BOA}`)")
    config = {"model_type": "fuyu", "architectures": ["FuyuForCausalLM"], "text_config": text,
              "patch_size": vis.config.patch_size, "num_channels": 3, "image_token_id": image_id,
              "tie_word_embeddings": False}
    layouts = {con.name: lay(("vision_embed_tokens.", "linear.")), lm.name: _LM[1]}
    if session.tokenizer is None:
        return Export(config, layouts)
    files = {"preprocessor_config.json": image, "processor_config.json": {"processor_class": "FuyuProcessor"}}
    return Export(config, layouts, files)


_LM = (lay(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
       lay(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")))

FORMAT = VLMFormat(
    model_types=("fuyu",),
    family=MultiFamily("fuyu", {
        "projector": Part("connector", (lay(("model.vision_embed_tokens.", "linear.")),
                                        lay(("vision_embed_tokens.", "linear."))), kinds=frozenset({"linear"})),
        # always Persimmon (`read` refuses another text model); fixed kinds, as adept/fuyu-8b's flat config.json
        # has no `text_config` to name it
        "language": Part("language", _LM, kinds=frozenset({"persimmon"})),
    }, {"connector": "projector", "language": "language"}),
    components={"proj": "projector", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="FuyuForCausalLM",
    processor="`FuyuProcessor`: `FuyuImageProcessor` (fit into the canvas, pad to whole patches, one token per "
              "patch, `|NEWLINE|` per row)",
    chat_template="none: the processor's layout (image rows, `<s>`, the text, `<0x04>`) becomes `prompt`",
)

"""`import_hf`: a Hugging Face VLM folder -> an equivalent, readable `.vlm` spec.

The spec's components point `weights` at the folder, each at its named part (`DIR#vision`, ...),
so that building the spec and loading its weights gives the same model. Supported: LLaVA
(`LlavaForConditionalGeneration`, CLIP vision tower, Llama / Mistral / Qwen2 text), BLIP-2 and
InstructBLIP (EVA vision, Q-Former, OPT / Llama text). Settings the spec cannot express (a rope
scaling, attention biases on the output projection, ...) are an error (E0585), never dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.errors import UNSUPPORTED, weights_error
from vlmspec.runtime.weights.families import MULTI, pick_layout
from vlmspec.runtime.weights.source import CheckpointSource, read_config

_VISION_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "silu": "silu"}
_CONNECTOR_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
                  "quick_gelu": "quick_gelu"}


def import_hf(folder: str | Path, *, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Read a VLM folder; return (spec text, mapping).

    mapping: {"architecture", "model_type", "model" (the spec's model name), "image_token_id" (pass it to
    `build_model` / `build_with_weights`), "components": {name: {"weights", "family", "layout"}}}.
    """
    path = Path(folder).resolve()
    config = read_config(path)
    mt = str(config.get("model_type", ""))
    importers = {"llava": _llava, "blip-2": _blip2, "instructblip": _blip2}
    if mt not in importers:
        arch = ", ".join(config.get("architectures") or []) or mt
        raise weights_error(UNSUPPORTED, f"{path} is a `{mt}` model ({arch}); import_hf reads "
                            + ", ".join(f"`{m}`" for m in importers), help="build the spec by hand and point each "
                            "component's `weights` at a single-model checkpoint")
    model = name or _identifier(f"{mt}_import")
    blocks, image_token = importers[mt](config, str(path))
    arch = ", ".join(config.get("architectures") or [mt])
    setting = f"  image_token_id = {image_token}\n" if image_token is not None else ""
    text = (f"# Imported from {path}\n# ({arch}) by vlmspec.runtime.weights.import_hf.\nmodel {model} {{\n"
            + "\n".join(blocks) + setting + "}\n")
    from vlmspec.compiler.printer import format_text

    text = format_text(text.replace("}}\n", "}\n}\n"), "imported.vlm")
    source = CheckpointSource(path)
    keys = source.keys()
    components: dict[str, Any] = {}
    for comp, part in _PARTS[mt].items():
        layout = pick_layout_for(mt, part, keys)
        components[comp] = {"weights": f"{path}#{part}", "family": f"{mt}#{part}",
                            "layout": [list(r) for r in layout] if layout else None}
    return text, {"architecture": arch, "model_type": mt, "model": model, "image_token_id": image_token,
                  "components": components}


_PARTS = {"llava": {"clip": "vision", "proj": "projector", "llm": "language"},
          "blip-2": {"eva": "vision", "qf": "qformer", "llm": "language"},
          "instructblip": {"eva": "vision", "qf": "qformer", "llm": "language"}}


def pick_layout_for(mt: str, part: str, keys: list[str]) -> tuple[tuple[str, str], ...] | None:
    from vlmspec.runtime.weights.families import Resolved

    p = MULTI[mt].parts[part]
    layout = pick_layout(Resolved(mt, p.layouts), keys)
    return layout.rules if layout else None


def _identifier(text: str) -> str:
    out = re.sub(r"\W", "_", text)
    return out if out[:1].isalpha() else f"m_{out}"


def _fields(pairs: list[tuple[str, Any]]) -> str:
    """`key = value` lines of a component body (strings quoted, floats as written)."""
    lines = []
    for k, v in pairs:
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str) and not v.startswith(("layer(", "layers(")):
            v = f'"{v}"'
        lines.append(f"    {k} = {v}")
    return "\n".join(lines)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise weights_error(UNSUPPORTED, f"import_hf: {what}", help="a spec cannot express it yet; build the spec "
                            "by hand, or drop that setting from the checkpoint's config")


def _rope_theta(tc: dict[str, Any]) -> float:
    rp = tc.get("rope_parameters") or {}
    _need(rp.get("rope_type", "default") == "default" and not tc.get("rope_scaling"),
          f"rope scaling `{rp.get('rope_type')}` of the text model")
    return float(rp.get("rope_theta", tc.get("rope_theta", 10000.0)))


def _language(tc: dict[str, Any], weights: str, tie: bool) -> str:
    mt = tc.get("model_type", "llama")
    if mt in ("llama", "mistral", "qwen2"):
        _need(not tc.get("mlp_bias"), "Llama `mlp_bias`")
        _need(not tc.get("attention_bias") or mt == "qwen2", "Llama `attention_bias` (a biased output projection)")
        _need(tc.get("hidden_act", "silu") == "silu", f"text activation {tc.get('hidden_act')}")
        heads = tc["num_attention_heads"]
        pairs: list[tuple[str, Any]] = [
            ("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", heads),
            ("kv_heads", tc.get("num_key_value_heads") or heads), ("ffn", tc["intermediate_size"]),
            ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"]),
            ("norm_eps", tc.get("rms_norm_eps", 1e-6)), ("rope_theta", _rope_theta(tc))]
        hd = tc.get("head_dim")
        if hd and hd != tc["hidden_size"] // heads:
            pairs.append(("head_dim", hd))
        if mt == "qwen2":
            pairs.append(("qkv_bias", True))
        pairs += [("tie_embeddings", tie), ("weights", weights)]
        return f"  language llm = llama {{\n{_fields(pairs)}\n  }}"
    if mt == "opt":
        _need(tc.get("do_layer_norm_before", True), "OPT with post-LayerNorm (`do_layer_norm_before = false`)")
        _need(tc.get("enable_bias", True) and tc.get("layer_norm_elementwise_affine", True),
              "OPT without biases or LayerNorm affine")
        act = tc.get("activation_function", "relu")
        _need(act in ("relu", "gelu"), f"OPT activation {act}")
        pairs = [("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", tc["num_attention_heads"]),
                 ("ffn", tc["ffn_dim"]), ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"])]
        if tc.get("word_embed_proj_dim", tc["hidden_size"]) != tc["hidden_size"]:
            pairs.append(("embed_dim", tc["word_embed_proj_dim"]))
        pairs += [("act", act), ("tie_embeddings", tie), ("weights", weights)]
        return f"  language llm = opt {{\n{_fields(pairs)}\n  }}"
    raise weights_error(UNSUPPORTED, f"import_hf: text model `{mt}`", help="supported: llama, mistral, qwen2, opt")


def _tie(config: dict[str, Any], tc: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in tc:
        return bool(tc["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))


def _llava(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config["vision_config"], config["text_config"]
    _need(vc.get("model_type") == "clip_vision_model", f"LLaVA vision tower `{vc.get('model_type')}` (CLIP only)")
    act = vc.get("hidden_act", "quick_gelu")
    _need(act in _VISION_ACT, f"vision activation {act}")
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    _need(strategy in ("default", "full"), f"vision_feature_select_strategy {strategy}")
    feature = (f"layer({layer})" if isinstance(layer, int) else f"layers({list(layer)})") + \
        (".patches" if strategy == "default" else ".all")
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", _VISION_ACT[act]),
              ("norm_eps", vc.get("layer_norm_eps", 1e-5)), ("feature", feature), ("weights", f"{folder}#vision")]
    pact = config.get("projector_hidden_act", "gelu")
    _need(pact in _CONNECTOR_ACT, f"projector activation {pact}")
    _need(config.get("multimodal_projector_bias", True), "a projector without biases")
    grid = (vc["image_size"] // vc["patch_size"]) ** 2 + (1 if strategy == "full" else 0)
    tokens = grid
    proj = _fields([("layers", 2), ("act", _CONNECTOR_ACT[pact]), ("weights", f"{folder}#projector")])
    return [
        f"  vision clip = vit {{\n{_fields(vision)}\n  }}",
        f"  connector proj = mlp(clip -> llm) {{\n{proj}\n  }}",
        _language(tc, f"{folder}#language", _tie(config, tc)),
        f"  fusion prefix(proj -> llm) {{\n{_fields([('tokens', tokens)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 32000)))


def _blip2(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, qc, tc = config["vision_config"], config["qformer_config"], config["text_config"]
    instruct = config.get("model_type") == "instructblip"
    _need(config.get("use_decoder_only_language_model", True), "an encoder-decoder (T5) language model")
    act = vc.get("hidden_act", "gelu")
    _need(act in _VISION_ACT and qc.get("hidden_act", "gelu") == "gelu", f"vision activation {act}")
    _need(vc.get("qkv_bias", True), "an EVA tower without q/v biases")
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", _VISION_ACT[act]), ("norm_eps", vc.get("layer_norm_eps", 1e-6)),
              ("feature", "layer(-1).all"), ("weights", f"{folder}#vision")]
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
        f"  vision eva = eva {{\n{_fields(vision)}\n  }}",
        f"  connector qf = qformer(eva -> llm) {{\n{_fields(qf)}\n  }}",
        _language(tc, f"{folder}#language", _tie(config, tc)),
        f"  fusion prefix(qf -> llm) {{\n{_fields([('tokens', nq)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 0)) or 0)


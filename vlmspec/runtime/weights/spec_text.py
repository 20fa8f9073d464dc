"""Pieces of `.vlm` text that the Hugging Face importers share: field lines, the language block,
and the check that refuses a setting a spec cannot express (E0585), never dropping it."""

from __future__ import annotations

import re
from typing import Any

from vlmspec.runtime.weights.errors import UNSUPPORTED, weights_error

VISION_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "silu": "silu"}
CONNECTOR_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
                  "quick_gelu": "quick_gelu"}


def identifier(text: str) -> str:
    out = re.sub(r"\W", "_", text)
    return out if out[:1].isalpha() else f"m_{out}"


class Raw(str):
    """A value written as is (a call such as `llama3(factor = 8.0)`), not as a quoted string."""


def fields(pairs: list[tuple[str, Any]]) -> str:
    """`key = value` lines of a component body (strings quoted, floats as written)."""
    lines = []
    for k, v in pairs:
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str) and not isinstance(v, Raw) and not v.startswith(("layer(", "layers(")):
            v = f'"{v}"'
        lines.append(f"    {k} = {v}")
    return "\n".join(lines)


def need(cond: bool, what: str) -> None:
    if not cond:
        raise weights_error(UNSUPPORTED, f"import_hf: {what}", help="a spec cannot express it yet; build the spec "
                            "by hand, or drop that setting from the checkpoint's config")


def rope_fields(tc: dict[str, Any]) -> list[tuple[str, Any]]:
    """`rope_theta`, plus `rope = llama3(...)` for Llama 3.1's scaling (transformers' `rope_parameters`, or
    the older `rope_scaling` + `rope_theta`); other scalings are refused."""
    rp = dict(tc.get("rope_parameters") or {})
    rp.update(tc.get("rope_scaling") or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", tc.get("rope_theta", 10000.0)))
    if kind == "default":
        return [("rope_theta", theta)]
    need(kind == "llama3", f"rope scaling `{kind}` of the text model")
    call = (f"llama3(factor = {float(rp.get('factor', 8.0))}, low_freq_factor = {float(rp.get('low_freq_factor', 1.0))}, "
            f"high_freq_factor = {float(rp.get('high_freq_factor', 4.0))}, "
            f"original_max_positions = {int(rp.get('original_max_position_embeddings', 8192))})")
    return [("rope_theta", theta), ("rope", Raw(call))]


def rope_theta(tc: dict[str, Any]) -> float:
    """The rotary base of a text model whose spec kind takes no RoPE scaling (Gemma, IDEFICS' Llama)."""
    pairs = rope_fields(tc)
    need(len(pairs) == 1, "rope scaling `llama3` of the text model")
    return float(pairs[0][1])


# transformers maps Gemma's legacy `gelu` to the tanh approximation (GemmaConfig.__post_init__)
GEMMA_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu"}


# transformers' Phi-1/2 activations (`gelu_new` is the tanh approximation)
PHI_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def partial_rotary(tc: dict[str, Any], default: float) -> float:
    """The fraction of each head that is rotated (`rope_parameters`, or the older top-level field)."""
    rp = tc.get("rope_parameters") or {}
    return float(rp.get("partial_rotary_factor", tc.get("partial_rotary_factor", default)))


def _phi3(tc: dict[str, Any]) -> None:
    """Phi-3 as a `llama` (its fused tensors are split at load): refuse what Llama's decoder lacks."""
    need(partial_rotary(tc, 1.0) == 1.0, f"Phi-3 `partial_rotary_factor = {partial_rotary(tc, 1.0)}` (a `llama` "
         "rotates whole heads)")


def _phi(tc: dict[str, Any], weights: str, tie: bool, head_bias: bool) -> str:
    """Phi-1 / Phi-1.5 / Phi-2 (`PhiForCausalLM`); PhiConfig's defaults where a config leaves a field out."""
    need(not tc.get("qk_layernorm"), "Phi `qk_layernorm` (LayerNorms on queries and keys)")
    need(not (tie and head_bias), "Phi with tied embeddings (its head keeps a bias of its own)")
    act = tc.get("hidden_act", "gelu_new")
    need(act in PHI_ACT, f"Phi activation {act}")
    heads = tc.get("num_attention_heads", 32)
    pairs: list[tuple[str, Any]] = [
        ("width", tc.get("hidden_size", 2048)), ("depth", tc.get("num_hidden_layers", 24)), ("heads", heads),
        ("kv_heads", tc.get("num_key_value_heads") or heads), ("ffn", tc.get("intermediate_size", 8192)),
        ("vocab", tc.get("vocab_size", 51200)), ("max_positions", tc.get("max_position_embeddings", 2048)),
        ("norm_eps", tc.get("layer_norm_eps", 1e-5)), *rope_fields(tc),
        ("partial_rotary", partial_rotary(tc, 0.5)), ("act", PHI_ACT[act]), ("tie_embeddings", tie)]
    if not head_bias:
        pairs.append(("head_bias", False))
    pairs.append(("weights", weights))
    return f"  language llm = phi {{\n{fields(pairs)}\n  }}"


def language_block(tc: dict[str, Any], weights: str, tie: bool, head_bias: bool = True) -> str:
    """The `language llm = ... { }` block of a text config (Llama / Mistral / Qwen2 / Phi-3, OPT, Gemma, Phi).
    `head_bias = False`: the checkpoint's format gives the text model its own head without a bias (LLaVA),
    where the family's has one (Phi)."""
    mt = tc.get("model_type", "llama")
    if mt == "phi":
        return _phi(tc, weights, tie, head_bias)
    if mt in ("llama", "mistral", "qwen2", "phi3"):
        need(not tc.get("mlp_bias"), "Llama `mlp_bias`")
        need(not tc.get("attention_bias") or mt == "qwen2", "Llama `attention_bias` (a biased output projection)")
        need(tc.get("hidden_act", "silu") == "silu", f"text activation {tc.get('hidden_act')}")
        if mt == "phi3":
            _phi3(tc)
        # Mistral and Phi-3 attend within a window; Qwen2 only with `use_sliding_window`. A window as long as
        # the context changes nothing; a shorter one is attention a `llama` does not do.
        window = tc.get("sliding_window") if mt != "qwen2" or tc.get("use_sliding_window") else None
        need(window is None or window >= tc["max_position_embeddings"],
             f"{mt} `sliding_window = {window}` (sliding-window attention, shorter than `max_position_embeddings`)")
        heads = tc["num_attention_heads"]
        pairs: list[tuple[str, Any]] = [
            ("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", heads),
            ("kv_heads", tc.get("num_key_value_heads") or heads), ("ffn", tc["intermediate_size"]),
            ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"]),
            ("norm_eps", tc.get("rms_norm_eps", 1e-5 if mt == "phi3" else 1e-6)), *rope_fields(tc)]
        hd = tc.get("head_dim")
        if hd and hd != tc["hidden_size"] // heads:
            pairs.append(("head_dim", hd))
        if mt == "qwen2":
            pairs.append(("qkv_bias", True))
        pairs += [("tie_embeddings", tie), ("weights", weights)]
        return f"  language llm = llama {{\n{fields(pairs)}\n  }}"
    if mt == "opt":
        need(tc.get("do_layer_norm_before", True), "OPT with post-LayerNorm (`do_layer_norm_before = false`)")
        need(tc.get("enable_bias", True) and tc.get("layer_norm_elementwise_affine", True),
              "OPT without biases or LayerNorm affine")
        act = tc.get("activation_function", "relu")
        need(act in ("relu", "gelu"), f"OPT activation {act}")
        pairs = [("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", tc["num_attention_heads"]),
                 ("ffn", tc["ffn_dim"]), ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"])]
        if tc.get("word_embed_proj_dim", tc["hidden_size"]) != tc["hidden_size"]:
            pairs.append(("embed_dim", tc["word_embed_proj_dim"]))
        pairs += [("act", act), ("tie_embeddings", tie), ("weights", weights)]
        return f"  language llm = opt {{\n{fields(pairs)}\n  }}"
    if mt == "gemma":  # GemmaConfig's defaults where a config leaves a field out
        need(not tc.get("attention_bias"), "Gemma `attention_bias`")
        act = tc.get("hidden_act") or tc.get("hidden_activation") or "gelu_pytorch_tanh"
        need(act in GEMMA_ACT, f"Gemma activation {act}")
        heads = tc.get("num_attention_heads", 16)
        pairs = [
            ("width", tc.get("hidden_size", 3072)), ("depth", tc.get("num_hidden_layers", 28)), ("heads", heads),
            ("kv_heads", tc.get("num_key_value_heads") or heads), ("head_dim", tc.get("head_dim") or 256),
            ("ffn", tc.get("intermediate_size", 24576)), ("vocab", tc.get("vocab_size", 256000)),
            ("max_positions", tc.get("max_position_embeddings", 8192)), ("norm_eps", tc.get("rms_norm_eps", 1e-6)),
            ("rope_theta", rope_theta(tc)), ("act", GEMMA_ACT[act]), ("tie_embeddings", tie), ("weights", weights)]
        return f"  language llm = gemma {{\n{fields(pairs)}\n  }}"
    if mt == "mamba":
        return _mamba(tc, weights, tie)
    if mt == "t5":  # an encoder-decoder: its reader lives with BLIP-2 Flan-T5's format
        from vlmspec.runtime.weights.formats.blip2 import t5_block

        return t5_block(tc, weights)
    if mt == "persimmon":  # Fuyu's decoder; its reader lives with the Fuyu format
        from vlmspec.runtime.weights.formats.fuyu import persimmon_block

        return persimmon_block(tc, weights, tie)
    raise weights_error(UNSUPPORTED, f"import_hf: text model `{mt}`",
                        help="supported: llama, mistral, qwen2, phi3, opt, gemma, phi, mamba, persimmon, t5")


def _mamba(tc: dict[str, Any], weights: str, tie: bool) -> str:
    """Mamba-1 (`MambaForCausalLM`); MambaConfig's defaults where a config leaves a field out. Settings that
    only shape initialisation (`time_step_*`, `rescale_prenorm_residual`) or pick a kernel are not the spec's."""
    act = tc.get("hidden_act", "silu")
    need(act == "silu", f"Mamba activation {act} (the mixer's convolution and gate use silu)")
    width, expand = int(tc.get("hidden_size", 768)), int(tc.get("expand", 2))
    inner = tc.get("intermediate_size", expand * width)
    need(inner == expand * width, f"Mamba `intermediate_size = {inner}` other than expand x hidden_size")
    pairs: list[tuple[str, Any]] = [
        ("width", width), ("depth", tc.get("num_hidden_layers", 32)), ("state", tc.get("state_size", 16)),
        ("conv", tc.get("conv_kernel", 4)), ("expand", expand)]
    rank = tc.get("time_step_rank", "auto")
    if rank != "auto" and int(rank) != -(-width // 16):
        pairs.append(("dt_rank", int(rank)))
    pairs += [("vocab", tc.get("vocab_size", 50280)), ("norm_eps", float(tc.get("layer_norm_epsilon", 1e-5))),
              ("conv_bias", bool(tc.get("use_conv_bias", True))), ("bias", bool(tc.get("use_bias", False))),
              ("residual_fp32", bool(tc.get("residual_in_fp32", True))), ("tie_embeddings", tie), ("weights", weights)]
    return f"  language llm = mamba {{\n{fields(pairs)}\n  }}"


def tie(config: dict[str, Any], tc: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in tc:
        return bool(tc["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))

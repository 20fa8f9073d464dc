"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`):
EVA vision tower, Q-Former (with instruction input for InstructBLIP), OPT / Llama text model."""

from __future__ import annotations

from typing import Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, VLMFormat
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, language_block, need, tie


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, qc, tc = config["vision_config"], config["qformer_config"], config["text_config"]
    instruct = config.get("model_type") == "instructblip"
    need(config.get("use_decoder_only_language_model", True), "an encoder-decoder (T5) language model")
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
        language_block(tc, f"{folder}#language", tie(config, tc)),
        f"  fusion prefix(qf -> llm) {{\n{fields([('tokens', nq)])}\n  }}",
    ], int(config.get("image_token_index", config.get("image_token_id", 0)) or 0)


def _family(mt: str) -> MultiFamily:
    qformer = (lay(("query_tokens", "query_tokens"), ("qformer.", "qformer."),
                   ("language_projection.", "language_projection.")),)
    return MultiFamily(mt, {
        "vision": Part("vision", (lay(("model.vision_model.", "")), lay(("vision_model.", ""))),
                       sub_config="vision_config"),
        "qformer": Part("connector", qformer, kinds=frozenset({"qformer"})),
        "language": Part("language", LLAVA_LM, sub_config="text_config"),
    }, {"vision": "vision", "connector": "qformer", "language": "language"})


_COMPONENTS = {"eva": "vision", "qf": "qformer", "llm": "language"}
FORMATS = (VLMFormat(("blip-2",), _family("blip-2"), _COMPONENTS, read),
           VLMFormat(("instructblip",), _family("instructblip"), _COMPONENTS, read))

"""LLaVA (`LlavaForConditionalGeneration`): CLIP or SigLIP vision tower, 2-layer MLP projector, Llama / Mistral /
Qwen2 / Phi-3 (a `llama`, its fused tensors split at load) or Phi-1/2 (`phi`) text model, prefix fusion."""

from __future__ import annotations

from typing import Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, VLMFormat
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, VISION_ACT, fields, language_block, need, tie


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config["vision_config"], config["text_config"]
    tower = vc.get("model_type")
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
    components={"clip": "vision", "siglip": "vision", "proj": "projector", "llm": "language"},
    read=read,
)

"""LLaVA (`LlavaForConditionalGeneration`): CLIP vision tower, 2-layer MLP projector, Llama / Mistral /
Qwen2 text model, prefix fusion."""

from __future__ import annotations

from typing import Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, VLMFormat
from vlmspec.runtime.weights.spec_text import CONNECTOR_ACT, VISION_ACT, fields, language_block, need, tie


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config["vision_config"], config["text_config"]
    need(vc.get("model_type") == "clip_vision_model", f"LLaVA vision tower `{vc.get('model_type')}` (CLIP only)")
    act = vc.get("hidden_act", "quick_gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    need(strategy in ("default", "full"), f"vision_feature_select_strategy {strategy}")
    feature = (f"layer({layer})" if isinstance(layer, int) else f"layers({list(layer)})") + \
        (".patches" if strategy == "default" else ".all")
    vision = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), ("width", vc["hidden_size"]),
              ("depth", vc["num_hidden_layers"]), ("heads", vc["num_attention_heads"]),
              ("mlp", vc["intermediate_size"]), ("act", VISION_ACT[act]),
              ("norm_eps", vc.get("layer_norm_eps", 1e-5)), ("feature", feature), ("weights", f"{folder}#vision")]
    pact = config.get("projector_hidden_act", "gelu")
    need(pact in CONNECTOR_ACT, f"projector activation {pact}")
    need(config.get("multimodal_projector_bias", True), "a projector without biases")
    grid = (vc["image_size"] // vc["patch_size"]) ** 2 + (1 if strategy == "full" else 0)
    tokens = grid
    proj = fields([("layers", 2), ("act", CONNECTOR_ACT[pact]), ("weights", f"{folder}#projector")])
    return [
        f"  vision clip = vit {{\n{fields(vision)}\n  }}",
        f"  connector proj = mlp(clip -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc)),
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
    components={"clip": "vision", "proj": "projector", "llm": "language"},
    read=read,
)

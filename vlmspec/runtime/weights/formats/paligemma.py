"""PaliGemma (`PaliGemmaForConditionalGeneration`): SigLIP vision tower, one linear projector, Gemma text
model, prefix fusion with a bidirectional prefix (image tokens + prompt), the answer causal.

Image features are spliced in unscaled: transformers scales the token embeddings by sqrt(width)
inside Gemma's embedding (older versions divided the features by sqrt(width) and scaled the whole
sequence, the same numbers), which is what `CausalLM.embed` followed by the splice does. Hugging Face
counts positions from 1; rotary attention depends only on position differences, so that changes nothing.
"""

from __future__ import annotations

from typing import Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, VLMFormat
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.source import CheckpointSource
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, language_block, need, tie


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
)

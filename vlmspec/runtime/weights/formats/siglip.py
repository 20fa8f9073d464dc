"""SigLIP (`SiglipModel`): a SigLIP image tower pooled by its attention-pooling head and a bidirectional text
tower pooled at the last position through a linear head, compared without projections under the sigmoid loss:
`fusion contrastive(img + txt) { loss = sigmoid  temperature = ...  bias = ... }`.

The checkpoint's learned log-scale and bias are written as `temperature = exp(-logit_scale)` and
`bias = logit_bias`, which the fusion turns back into the same two parameters. SiglipImageProcessor resizes
to the square without keeping the aspect ratio (`fit = stretch`, the default); SiglipProcessor pads every
caption to `max_positions` (the tower pools the last position). The readers are CLIP's (`formats/clip.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from vlmspec.runtime.weights.families import Layout, MultiFamily, Part
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, refuse_unplaced
from vlmspec.runtime.weights.formats.clip import (
    _TEXT,
    _VISION,
    _fit,
    checkpoint_scalar,
    exact_towers,
    family,
    head_block,
    image_processor,
    layouts,
    sub,
    temperature,
    text_block,
    text_config,
    towers,
    vision_block,
    vision_config,
)
from vlmspec.runtime.weights.spec_text import Raw, need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import ModelIR
    from vlmspec.runtime.session import Session

SIGLIP_TEXT = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6}
SIGLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                 "vision_use_head": True}
SIGLIP_HEAD = (("logit_scale", "logit_scale"), ("logit_bias", "logit_bias"))


@dataclass(frozen=True, slots=True)
class OneElementLayout(Layout):
    """SiglipModel stores its learned scale and bias as one-element vectors; the contrastive head holds them
    as scalars (as CLIPModel stores its scale). Read [1] as [], and write [] back as [1]."""

    def convert(self, key: str, tensor: Tensor) -> Tensor:
        return tensor.reshape(()) if tensor.shape == (1,) else tensor

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return () if shape == (1,) else shape

    def unconvert(self, key: str, tensor: Tensor) -> Tensor:
        return tensor.reshape(1) if tensor.dim() == 0 else tensor


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int | None]:
    tc, vc = sub(config, "text_config", SIGLIP_TEXT), sub(config, "vision_config", SIGLIP_VISION)
    need(bool(vc.get("vision_use_head", True)), "a SigLIP image tower without its pooling head (vision_use_head)")
    projection = int(tc.get("projection_size") or tc["hidden_size"])
    extra = [("projection", projection)] if projection != tc["hidden_size"] else []
    bias = checkpoint_scalar(folder, "logit_bias")
    head = [("loss", Raw("sigmoid")), ("temperature", temperature(folder, config)),
            ("bias", bias if bias is not None else -10.0)]
    return [vision_block("siglip", vc, folder, [("pool_head", True)]), text_block("siglip_text", tc, folder, extra),
            head_block(head, folder)], None


def claims(ir: ModelIR) -> bool:
    return towers(ir, "siglip", "siglip_text") is not None


def write(session: Session) -> Export:
    """The `SiglipModel` folder of a SigLIP-shaped spec, in the layout transformers saves."""
    ir = session.analysis.ir
    vision, text, fusion = exact_towers(ir, "siglip", "siglip", "siglip_text")
    fit = _fit("siglip")
    v, t, f = vision.config, text.config, fusion.config
    fit(v.feature.pooled and v.pool_head and not v.class_token and not v.pre_norm and v.post_norm and v.patch_bias,
        "an image tower that is not SigLIP's (pooling head, no class token, `feature = pooled`)")
    fit(v.fit == "stretch", f"vision `{vision.name}` with fit = {v.fit} (SiglipImageProcessor resizes plainly)")
    refuse_unplaced(vision, fit, _VISION | {"pool_head"})
    refuse_unplaced(text, fit, _TEXT | {"projection"})
    fit(f.dim is None and f.loss == "sigmoid", "a contrastive fusion with `dim` or the softmax loss (SigLIP has "
        "no projections and uses the sigmoid loss)")
    tc = {**text_config(t), "projection_size": t.pooled_width}
    config = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": tc,
              "vision_config": {**vision_config(v), "vision_use_head": True}}
    files = {"preprocessor_config.json": image_processor(v, "SiglipImageProcessor", False)}
    out = layouts(vision, text, fusion, SIGLIP_HEAD)
    out[fusion.name] = OneElementLayout(SIGLIP_HEAD)
    return Export(config, out, files)


FORMAT = VLMFormat(
    model_types=("siglip",),
    family=MultiFamily("siglip", {**family("siglip", SIGLIP_HEAD, "siglip", "siglip_text").parts,
                                  "head": Part("fusion", (OneElementLayout(SIGLIP_HEAD),), kinds=frozenset({"contrastive"}))},
                       {"vision": "vision", "text": "text", "fusion": "head"}),
    components={"img": "vision", "txt": "text", "contrastive": "head"},
    read=read, claims=claims, write=write, hf_class="SiglipModel",
    processor="SiglipImageProcessor: plain resize to the square; captions padded to max_positions",
    chat_template="none: a contrastive model has no prompts; the tokenizer is kept",
)

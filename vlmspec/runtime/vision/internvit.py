"""`internvit`: InternViT, InternVL's tower (class token and positions as raw parameters, as its
checkpoints store them; separate q / k / v; layer scale)."""

from __future__ import annotations

from vlmspec.compiler.ir import Component
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.vision.encoder import VisionEncoder


@register("vision", "internvit")
def build_internvit(comp: Component, ctx: BuildContext) -> VisionEncoder:
    # the schema's `internvit` kind fills in what differs (out_bias, post_norm_kind, layer_scale defaults)
    return VisionEncoder(comp.config, fused_qkv=False, raw_params=True)

"""`vit`: CLIP's vision tower (and Qwen2-VL's, with `position = rope2d`)."""

from __future__ import annotations

from vlmspec.compiler.ir import Component
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.vision.encoder import VisionEncoder


@register("vision", "vit")
def build_vit(comp: Component, ctx: BuildContext) -> VisionEncoder:
    # a rope2d ViT is Qwen2-VL's, whose attention has one fused, biased `qkv` (same parameter count)
    fused = comp.config.position == "rope2d"
    return VisionEncoder(comp.config, fused_qkv=fused, raw_params=False)

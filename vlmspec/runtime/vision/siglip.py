"""`siglip`: SigLIP's vision tower (no class token; optional attention-pooling head)."""

from __future__ import annotations

from vlmspec.compiler.ir import Component
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.vision.encoder import VisionEncoder


@register("vision", "siglip")
def build_siglip(comp: Component, ctx: BuildContext) -> VisionEncoder:
    return VisionEncoder(comp.config, fused_qkv=False, raw_params=False)

"""`eva`: EVA-CLIP, BLIP-2's tower (fused, biased QKV; raw class token and positions)."""

from __future__ import annotations

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.vision import EVA
from vlmspec.diagnostics import user_error
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.vision.encoder import VisionEncoder


@register("vision", "eva")
def build_eva(comp: Component, ctx: BuildContext) -> VisionEncoder:
    cfg = comp.config
    if not isinstance(cfg, EVA):
        raise user_error("E0592", f"`{comp.name}` is not an EVA encoder")
    return VisionEncoder(cfg, fused_qkv=True, raw_params=True)

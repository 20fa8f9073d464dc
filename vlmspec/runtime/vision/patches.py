"""`patches`: Fuyu's encoder-free input. No parameters: each tile the processor cut (one patch,
`runtime/inputs/tiling.py`'s `PatchRowsTransform`) becomes one token, its pixels flattened row by row with
the channels innermost, as Fuyu's processor flattens a patch; the `linear` connector after it projects the
tokens into the language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.patches import Patches
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import SpecPart

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class PatchInput(nn.Module):
    """[n x c x p x p] patches -> VisualTokens [n x 1 x (p * p * c)] (no grid: a patch is its own image)."""

    image_dims = 3

    def __init__(self, cfg: Patches):
        super().__init__()
        self.cfg = cfg

    def forward(self, pixels: Tensor) -> VisualTokens:
        c, p = self.cfg.channels, self.cfg.patch_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, p, p):
            raise user_error("E0546", f"`patches` reads patches of {c} x {p} x {p}, got pixel_values shaped "
                             f"{tuple(pixels.shape)}", help="lay the images out with the processor's transform "
                             "(`rows(...)` cuts them into patches) and pass its image_sizes")
        x = pixels.permute(0, 2, 3, 1).reshape(pixels.shape[0], 1, p * p * c)
        return VisualTokens(x.to(getattr(torch, _DTYPES[self.cfg.dtype])), None)

    def spec_parts(self) -> list[SpecPart]:
        return []

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        return {}


@register("vision", "patches")
def build_patches(comp: Component, ctx: BuildContext) -> PatchInput:
    return PatchInput(comp.config)

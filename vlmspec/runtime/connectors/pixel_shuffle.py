"""`pixel_shuffle`: space-to-depth over the patch grid (InternVL, Idefics3), LayerNorm, then an MLP.

Tokens of each scale x scale block are concatenated row by row, the order InternVL's and Idefics3's
shuffles both produce; keys `norm`, `linear_1`, `linear_2` (InternVL's projector: `layer_norm`,
`linear_1`, `linear_2`; Idefics3's: `modality_projection.proj` is `linear_1`, without a bias).
"""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import PixelShuffle
from vlmspec.runtime.blocks import NumberedLinears, VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction, space_to_depth
from vlmspec.runtime.registry import BuildContext, register


class PixelShuffleConnector(Connector, NumberedLinears):
    """[n x (gh*gw) x d] -> [n x (gh/s * gw/s) x out]."""

    def __init__(self, name: str, cfg: PixelShuffle, d: int, out_width: int):
        super().__init__(name, cfg.merge)
        self.scale = cfg.scale
        shuffled = d * cfg.scale**2
        self.norm = nn.LayerNorm(shuffled) if cfg.norm else None
        self.add_linears(shuffled, cfg.hidden or out_width, out_width, cfg.layers, cfg.act)
        if not cfg.bias:  # `bias = false`: nn.Linear computes without a bias it does not hold
            for i in range(1, cfg.layers + 1):
                getattr(self, f"linear_{i}").bias = None

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        gh, gw = self.need_grid(x, self.scale, "scale")
        h = space_to_depth(x.x, (gh, gw), self.scale)
        if self.norm is not None:
            h = self.norm(h)
        return VisualTokens(self.run_linears(h), (gh // self.scale, gw // self.scale))


@register("connector", "pixel_shuffle")
def build_pixel_shuffle(comp: Component, ctx: BuildContext) -> PixelShuffleConnector:
    return PixelShuffleConnector(comp.name, comp.config, ctx.input_shape(comp.name).width,
                                 ctx.output_shape(comp.name).width)

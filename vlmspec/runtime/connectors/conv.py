"""`conv`: a strided convolution over the patch grid (CogVLM2-style 2x2 down-sampling), then an MLP.
Keys `conv`, `linear_1`, ..."""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import ConvDownsample
from vlmspec.runtime.blocks import NumberedLinears, VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction, from_grid, to_grid
from vlmspec.runtime.registry import BuildContext, register


class ConvConnector(Connector, NumberedLinears):
    """[n x (gh*gw) x d] -> [n x (gh/s * gw/s) x out]."""

    def __init__(self, name: str, cfg: ConvDownsample, d: int, out_width: int):
        super().__init__(name, cfg.merge)
        self.stride = cfg.stride
        self.conv = nn.Conv2d(d, d, cfg.stride, cfg.stride, bias=True)
        self.add_linears(d, out_width, out_width, cfg.layers, cfg.act)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        gh, gw = self.need_grid(x, self.stride, "stride")
        h = from_grid(self.conv(to_grid(x.x, (gh, gw))))
        return VisualTokens(self.run_linears(h), (gh // self.stride, gw // self.stride))


@register("connector", "conv")
def build_conv(comp: Component, ctx: BuildContext) -> ConvConnector:
    return ConvConnector(comp.name, comp.config, ctx.input_shape(comp.name).width, ctx.output_shape(comp.name).width)

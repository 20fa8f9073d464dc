"""`linear`: one projection from the merged encoder width to the consumer's width (LLaVA-1, PaliGemma)."""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register


class LinearConnector(Connector):
    """[n x t x d_in] -> [n x t x d_out]; the parameter is `linear` as in PaliGemma's projector."""

    def __init__(self, name: str, merge: str, d_in: int, d_out: int, bias: bool):
        super().__init__(name, merge)
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        return VisualTokens(self.linear(x.x), x.grid)


@register("connector", "linear")
def build_linear(comp: Component, ctx: BuildContext) -> LinearConnector:
    cfg = comp.config
    return LinearConnector(comp.name, cfg.merge, ctx.input_shape(comp.name).width,
                           ctx.output_shape(comp.name).width, cfg.bias)

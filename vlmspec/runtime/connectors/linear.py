"""`linear`: one projection from the merged encoder width to the consumer's width (LLaVA-1, PaliGemma)."""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register


class LinearConnector(Connector):
    """[n x t x d_in] -> [n x t/g x d_out]: each run of `group` consecutive tokens concatenated (MiniGPT-v2),
    then projected; the parameter is `linear` as in PaliGemma's projector."""

    def __init__(self, name: str, merge: str, d_in: int, d_out: int, bias: bool, group: int = 1):
        super().__init__(name, merge)
        self.group = group
        self.linear = nn.Linear(d_in * group, d_out, bias=bias)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        h, grid = x.x, x.grid
        if self.group > 1:
            n, t, d = h.shape
            if t % self.group:
                raise user_error("E0595", f"connector `{self.name}`: {t} tokens are not divisible by group = "
                                 f"{self.group}", help="use images whose token count is a multiple of the group")
            h = h.reshape(n, t // self.group, d * self.group)
            # runs of consecutive tokens stay a grid when they do not cross a row
            grid = (grid[0], grid[1] // self.group) if grid is not None and grid[1] % self.group == 0 else None
        return VisualTokens(self.linear(h), grid)


@register("connector", "linear")
def build_linear(comp: Component, ctx: BuildContext) -> LinearConnector:
    cfg = comp.config
    return LinearConnector(comp.name, cfg.merge, ctx.input_shape(comp.name).width,
                           ctx.output_shape(comp.name).width, cfg.bias, cfg.group)

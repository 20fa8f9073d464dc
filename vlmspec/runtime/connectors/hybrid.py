"""`hybrid`: DeepSeek-VL's aligner: a linear layer per source to a share of the width, the shares
concatenated token by token, an activation, a linear layer.

Keys: `inputs.i` (the i-th source's layer, in the spec's order) and `proj`; DeepSeek-VL's
`aligner.high_res_vision_proj` / `aligner.vision_proj` / `aligner.proj` map onto them (high-resolution
tower first, as its concatenation puts it).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens, activation, param_dtype
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart


class HybridConnector(Connector):
    """[n x t x d_i] per source -> cat_i(inputs.i(x_i)) -> act -> proj -> [n x t x d_out]."""

    def __init__(self, name: str, widths: list[int], d_out: int, act: str):
        super().__init__(name, "concat")
        share = d_out // len(widths)
        self.inputs = nn.ModuleList([nn.Linear(w, share) for w in widths])
        self.act = activation(act)
        self.proj = nn.Linear(share * len(widths), d_out)

    def spec_parts(self) -> list[SpecPart]:
        return [SpecPart("inputs", [self.inputs], GROUP), SpecPart("proj", [self.proj], GROUP)]

    def forward(self, sources: list[VisualTokens], instruction: Instruction | None = None) -> VisualTokens:
        if len(sources) != len(self.inputs):
            raise user_error("E0578", f"connector `{self.name}` has a layer for {len(self.inputs)} sources, got "
                             f"{len(sources)}")
        counts = {tuple(s.x.shape[:2]) for s in sources}
        if len(counts) > 1:
            grids = " and ".join(f"{s.grid[0]}x{s.grid[1]}" if s.grid else f"{s.x.shape[1]} tokens" for s in sources)
            raise user_error("E0578", f"connector `{self.name}` pairs tokens one to one, but its sources give {grids}",
                             help="the spec's encoders must end on one grid (a sam encoder's `downsample`)")
        dtype = param_dtype(self)
        x = torch.cat([layer(s.x.to(dtype)) for layer, s in zip(self.inputs, sources, strict=True)], dim=-1)
        return VisualTokens(self.proj(self.act(x)), sources[0].grid)


@register("connector", "hybrid")
def build_hybrid(comp: Component, ctx: BuildContext) -> HybridConnector:
    widths = [s.width for s in ctx.source_shapes(comp.name)]
    return HybridConnector(comp.name, widths, ctx.output_shape(comp.name).width, comp.config.act)

"""`c_abstractor`: Honeybee's C-Abstractor, in the simplified form the schema counts: a linear
projection in, `depth` residual conv blocks, adaptive average pooling to sqrt(queries)^2 tokens,
`depth` more blocks, and a two-layer readout.

Each block is LayerNorm -> SiLU -> 3x3 conv -> LayerNorm -> SiLU -> 3x3 conv (no conv bias), added
to its input; Honeybee uses RegNet bottleneck blocks with squeeze-excitation instead, which the
closed-form count (2 * 9 * hidden^2 + 2 LayerNorms per block) does not describe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import CAbstractor
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction, from_grid, to_grid
from vlmspec.runtime.registry import BuildContext, register


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [n x c x h x w] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = ChannelNorm(ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = ChannelNorm(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class CAbstractorConnector(Connector):
    """[n x t x d] on a square grid -> [n x queries x out]."""

    def __init__(self, name: str, cfg: CAbstractor, d: int, tokens: int, out_width: int):
        super().__init__(name, cfg.merge)
        h = cfg.hidden
        self.side = math.isqrt(cfg.queries)
        self.tokens = tokens
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, d)) if cfg.pos_emb else None
        self.proj_in = nn.Linear(d, h)
        self.s1 = nn.ModuleList([ResBlock(h) for _ in range(cfg.depth)])
        self.s2 = nn.ModuleList([ResBlock(h) for _ in range(cfg.depth)])
        self.readout = nn.Sequential(nn.Linear(h, out_width), nn.SiLU(), nn.Linear(out_width, out_width))

    def init_weights(self, std: float) -> None:
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=std)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        grid = self.need_grid(x, 1, "queries")
        h = x.x
        if self.pos_emb is not None:
            if h.shape[1] != self.tokens:
                raise user_error("E0595", f"connector `{self.name}` has learned positions for {self.tokens} tokens "
                                 f"but got {h.shape[1]}", help="use the encoder's image_size, or `pos_emb = false`")
            h = h + self.pos_emb
        m = to_grid(self.proj_in(h), grid)
        for blk in self.s1:
            m = blk(m)
        m = F.adaptive_avg_pool2d(m, self.side)
        for blk in self.s2:
            m = blk(m)
        return VisualTokens(self.readout(from_grid(m)), (self.side, self.side))


@register("connector", "c_abstractor")
def build_c_abstractor(comp: Component, ctx: BuildContext) -> CAbstractorConnector:
    shape = ctx.input_shape(comp.name)
    return CAbstractorConnector(comp.name, comp.config, shape.width, shape.tokens, ctx.output_shape(comp.name).width)

"""`ldp`: MobileVLM V2's lightweight downsample projector. MLP, pool x pool average pooling, then a
depthwise 3x3 convolution added back as a position encoding (PEG). Keys `mlp.0`, `mlp.2`, `peg`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import LDP
from vlmspec.runtime.blocks import Act, VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction, from_grid, to_grid
from vlmspec.runtime.registry import BuildContext, register


class LDPConnector(Connector):
    """[n x (gh*gw) x d] -> [n x (gh/p * gw/p) x out]."""

    def __init__(self, name: str, cfg: LDP, d: int, out_width: int):
        super().__init__(name, cfg.merge)
        self.pool = cfg.pool
        self.mlp = nn.Sequential(nn.Linear(d, out_width), Act(cfg.act), nn.Linear(out_width, out_width))
        self.peg = nn.Conv2d(out_width, out_width, 3, padding=1, groups=out_width, bias=True)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        gh, gw = self.need_grid(x, self.pool, "pool")
        h = to_grid(self.mlp(x.x), (gh, gw))
        h = F.avg_pool2d(h, self.pool)
        h = h + self.peg(h)
        return VisualTokens(from_grid(h), (gh // self.pool, gw // self.pool))


@register("connector", "ldp")
def build_ldp(comp: Component, ctx: BuildContext) -> LDPConnector:
    return LDPConnector(comp.name, comp.config, ctx.input_shape(comp.name).width, ctx.output_shape(comp.name).width)

"""`mlp`: N linear layers with an activation between them (LLaVA-1.5's `mlp2x_gelu`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.runtime.blocks import NumberedLinears, VisualTokens
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register


class MLPConnector(Connector, NumberedLinears):
    """[n x t x d_in] -> (LayerNorm) -> linear_1 -> act -> ... -> linear_N -> [n x t x d_out].

    Keys `linear_1`, `linear_2` are those of Hugging Face's `LlavaMultiModalProjector`.
    """

    def __init__(self, name: str, merge: str, d_in: int, hidden: int, d_out: int, layers: int, act: str, norm: bool,
                 newline: bool = False):
        super().__init__(name, merge)
        self.norm = nn.LayerNorm(d_in) if norm else None
        self.add_linears(d_in, hidden, d_out, layers, act)
        # an anyres encoder's row separator (LLaVA-NeXT's `image_newline`); the model lays the tiles out
        self.image_newline: Tensor | None = nn.Parameter(torch.empty(d_out).normal_(std=0.02)) if newline else None

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        h = self.norm(x.x) if self.norm is not None else x.x
        return VisualTokens(self.run_linears(h), x.grid)


@register("connector", "mlp")
def build_mlp(comp: Component, ctx: BuildContext) -> MLPConnector:
    cfg = comp.config
    x, d_out = ctx.input_shape(comp.name), ctx.output_shape(comp.name).width
    newline = x.layout is not None and getattr(x.layout[0], "newline", False)
    return MLPConnector(comp.name, cfg.merge, x.width, cfg.hidden or d_out, d_out, cfg.layers, cfg.act, cfg.norm,
                        newline)

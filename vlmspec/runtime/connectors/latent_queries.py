"""`latent_queries`: Kosmos-2's image-to-text projection (`Kosmos2ImageToTextProjection`).

The vision tokens (each L2-normalised first, with `normalize = true`) go through one dense layer into the
language model's width; `latents` learned queries then attend once, with biased q/k/v/out projections and
no norm or residual, over [projected features; queries]. Keys are Hugging Face's (`dense`, `latent_query`,
`x_attn.q_proj` / `k_proj` / `v_proj` / `out_proj`), so `vlm import-hf` loads a Kosmos-2 projection by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.kosmos2 import LatentQueries
from vlmspec.runtime.blocks import VisualTokens, attend, split_heads
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import SpecPart


class QueryAttention(nn.Module):
    """Queries [n x l x w] attend over context [n x t x w]; biased projections, HF's names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        q = split_heads(self.q_proj(queries), self.heads)
        k = split_heads(self.k_proj(context), self.heads)
        v = split_heads(self.v_proj(context), self.heads)
        return self.out_proj(attend(q, k, v))


class LatentQueryConnector(Connector):
    """[n x t x d] -> [n x latents x w]."""

    def __init__(self, name: str, cfg: LatentQueries, d: int, width: int):
        super().__init__(name, cfg.merge)
        self.normalize = cfg.normalize
        self.dense = nn.Linear(d, width)
        self.latent_query = nn.Parameter(torch.zeros(cfg.latents, width))
        self.x_attn = QueryAttention(width, cfg.heads)

    def spec_parts(self) -> list[SpecPart]:
        return [SpecPart("dense", [self.dense]), SpecPart("latents", [self.latent_query]),
                SpecPart("attn", [self.x_attn])]

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.latent_query, std=1.0)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        h = F.normalize(x.x, dim=-1) if self.normalize else x.x
        h = self.dense(h)
        q = self.latent_query.unsqueeze(0).expand(h.shape[0], -1, -1)
        return VisualTokens(self.x_attn(q, torch.cat([h, q], dim=1)), None)


@register("connector", "latent_queries")
def build_latent_queries(comp: Component, ctx: BuildContext) -> LatentQueryConnector:
    return LatentQueryConnector(comp.name, comp.config, ctx.input_shape(comp.name).width,
                                ctx.output_shape(comp.name).width)

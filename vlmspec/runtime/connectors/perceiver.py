"""`perceiver`: Flamingo's perceiver resampler. A fixed set of latents attends to [features; latents].

Keys follow Hugging Face's IDEFICS resampler (`latents`, `blocks.N.0` attention with
`context_layer_norm`, `latents_layer_norm`, `q_proj`, `k_proj`, `v_proj`, `output_proj` and, with
`qk_norm`, per-head `q_layer_norm` / `k_layer_norm`; `blocks.N.1`
feed-forward with `ln`, `fc`, `c_proj`; final `layer_norm`), so `vlm import-hf` loads an IDEFICS
resampler by key. The feed-forward's activation is `act`: GELU as in Flamingo by default, ReLU in IDEFICS.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import Perceiver
from vlmspec.runtime.blocks import CheckpointedBlocks, VisualTokens, activation, attend, split_heads
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart


class PerceiverAttention(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.q_layer_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_layer_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.context_layer_norm = nn.LayerNorm(d)
        self.latents_layer_norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.output_proj = nn.Linear(inner, d, bias=False)

    def forward(self, context: Tensor, latents: Tensor) -> Tensor:
        """context [n x t x d], latents [n x l x d] -> [n x l x d]."""
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        kv_in = torch.cat([context, latents], dim=1)
        q = split_heads(self.q_proj(latents), self.heads)
        k = split_heads(self.k_proj(kv_in), self.heads)
        v = split_heads(self.v_proj(kv_in), self.heads)
        if self.q_layer_norm is not None and self.k_layer_norm is not None:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        return self.output_proj(attend(q, k, v))


class PerceiverMLP(nn.Module):
    def __init__(self, d: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.act = activation(act)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


def resampler_block(attn: PerceiverAttention, mlp: PerceiverMLP, context: Tensor, latents: Tensor) -> Tensor:
    """One resampler block: the latents read the features, then their feed-forward (residual both)."""
    latents = latents + attn(context, latents)
    return latents + mlp(latents)


class PerceiverConnector(Connector, CheckpointedBlocks):
    """[n x t x d] -> [n x latents x d] (-> [n x latents x out] with `project = true`)."""

    def __init__(self, name: str, cfg: Perceiver, d: int, out_width: int):
        super().__init__(name, cfg.merge)
        self.latents = nn.Parameter(torch.zeros(cfg.latents, d))
        self.blocks = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(d, cfg.heads, cfg.head_dim, getattr(cfg, "qk_norm", False)),
                           PerceiverMLP(d, cfg.mlp_ratio * d, getattr(cfg, "act", "gelu"))])
            for _ in range(cfg.depth)
        ])
        self.layer_norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, out_width) if cfg.project else None

    def spec_parts(self) -> list[SpecPart]:
        return [SpecPart("latents", [self.latents]), SpecPart("layers", [self.blocks], GROUP),
                SpecPart("proj", [self.proj])]

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.latents, std=1.0)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        lat = self.latents.unsqueeze(0).expand(x.x.shape[0], -1, -1)
        for attn, mlp in self.blocks:
            lat = self.run_block(resampler_block, attn, mlp, x.x, lat)
        lat = self.layer_norm(lat)
        if self.proj is not None:
            lat = self.proj(lat)
        return VisualTokens(lat, None)


@register("connector", "perceiver")
def build_perceiver(comp: Component, ctx: BuildContext) -> PerceiverConnector:
    return PerceiverConnector(comp.name, comp.config, ctx.input_shape(comp.name).width,
                              ctx.output_shape(comp.name).width)

"""`pixtral`: Pixtral's ViT (transformers' `PixtralVisionModel`), parameter names as its checkpoints hold them
(`patch_conv`, `ln_pre`, `transformer.layers.N.attention.{q,k,v,o}_proj`, `feed_forward.{gate,up,down}_proj`,
`attention_norm`, `ffn_norm`), so an importer loads it by key with only the tower's prefix stripped.

Images of one size come as a batch [n x c x h x w]; the model groups images of several sizes by size
(`VLM._native_sizes`). transformers concatenates a batch's images into one sequence and masks attention
block-diagonally, one block per image; attention within a block does not depend on what else is in the
sequence, so attending within each image of a batch is the same computation, without the n^2 mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.pixtral import Pixtral
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import (
    CheckpointedBlocks,
    RMSNorm,
    Rotary,
    VisualTokens,
    activation,
    attend,
    inv_frequencies,
    split_heads,
)
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart
from vlmspec.runtime.vision.encoder import rotate_fp32


class PixtralRotary(nn.Module):
    """Pixtral's 2-D rope. A head-wide table of frequencies f_k = theta^(-2k / head_dim) is split by parity:
    the row index turns the first quarter of a head's channels with the even f_k, the column index the
    second quarter with the odd f_k, and the other half mirrors them (rotate-half), so every channel turns."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        f = inv_frequencies(head_dim, theta)
        self.register_buffer("rows", f[0::2].clone(), persistent=False)
        self.register_buffer("cols", f[1::2].clone(), persistent=False)

    def forward(self, grid: tuple[int, int], device: torch.device) -> Rotary:
        gh, gw = grid
        r = torch.arange(gh, device=device).repeat_interleave(gw).float()
        c = torch.arange(gw, device=device).repeat(gh).float()
        half = torch.cat([r[:, None] * self.rows.to(device), c[:, None] * self.cols.to(device)], dim=-1)
        emb = torch.cat([half, half], dim=-1)  # [t x head_dim]
        return Rotary.of(emb.cos()[None, None], emb.sin()[None, None])


class PixtralAttention(nn.Module):
    """Bias-free q, k, v, o projections; q and k turned by the 2-D rope."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, rotary: Rotary) -> Tensor:
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate_fp32(rotary, q, k)
        return self.o_proj(attend(q, k, v))


class PixtralMLP(nn.Module):
    """down(act(gate(x)) * up(x)), bias-free."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)), both norms RMSNorm."""

    def __init__(self, cfg: Pixtral):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attention = PixtralAttention(cfg.width, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.feed_forward = PixtralMLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x: Tensor, rotary: Rotary) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rotary)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, layers: list[PixtralLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class PixtralEncoder(nn.Module, CheckpointedBlocks):
    """[n x c x H x W] (H, W multiples of the patch) -> tokens [n x (H/p * W/p) x width] on an (H/p, W/p) grid,
    row by row, from the hidden states `feature` selects (only the layers up to the deepest selected run)."""

    image_dims = 3

    def __init__(self, cfg: Pixtral):
        super().__init__()
        self.cfg = cfg
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 4:
            raise user_error("E0567", f"pixtral: width {cfg.width} / heads {cfg.heads} is not a whole head width "
                             "that is a multiple of 4 (Pixtral's 2-D rope splits each head in quarters)",
                             help="choose width and heads so that width / heads is a multiple of 4")
        self.patch_conv = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.transformer = PixtralTransformer([PixtralLayer(cfg) for _ in range(cfg.depth)])
        self.rotary = PixtralRotary(cfg.width // cfg.heads, cfg.rope_theta)
        self.selected = [i if i >= 0 else cfg.depth + 1 + i for i in cfg.feature.layers]

    # --- what each spec path (`vit.attn`, `vit.norm`, ...) covers; see vlmspec.runtime.spec_paths
    def spec_parts(self) -> list[SpecPart]:
        layers = list(self.transformer.layers)
        return [SpecPart("embeddings", [self.patch_conv], GROUP), SpecPart("layers", [self.transformer.layers], GROUP),
                SpecPart("attn", [layer.attention for layer in layers]),
                SpecPart("mlp", [layer.feed_forward for layer in layers]),
                SpecPart("norm", [self.ln_pre])]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        for layer in self.transformer.layers:
            a, m = layer.attention, layer.feed_forward
            for target, linear in (("attn.q", a.q_proj), ("attn.k", a.k_proj), ("attn.v", a.v_proj),
                                   ("attn.o", a.o_proj), ("mlp.gate", m.gate_proj), ("mlp.up", m.up_proj),
                                   ("mlp.down", m.down_proj)):
                out.setdefault(target, []).append(linear)
        return out

    def _check(self, pixels: Tensor) -> None:
        cfg = self.cfg
        if pixels.dim() != 4 or pixels.shape[1] != cfg.channels:
            raise user_error("E0568", f"pixtral reads images as [batch x {cfg.channels} x height x width], got "
                             f"shape {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise user_error("E0568", f"pixtral: an image of {h}x{w} pixels is not whole {cfg.patch_size}-pixel "
                             "patches", help="resize it with the model's processor (sides rounded up to whole "
                             "patches), or pass image_sizes with images padded at the bottom and right")

    def forward(self, pixels: Tensor) -> VisualTokens:
        self._check(pixels)
        x = self.patch_conv(pixels.to(self.patch_conv.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = self.ln_pre(x.flatten(2).transpose(1, 2))
        rotary = self.rotary(grid, x.device)
        states = {0: x}
        last = max(self.selected)
        for i, layer in enumerate(self.transformer.layers[:last]):
            x = self.run_block(layer, x, rotary)
            states[i + 1] = x
        feats = [states[i] for i in self.selected]
        return VisualTokens(feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1), grid)


@register("vision", "pixtral")
def build_pixtral(comp: Component, ctx: BuildContext) -> PixtralEncoder:
    return PixtralEncoder(comp.config)

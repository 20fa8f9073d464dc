"""`sam`: SAM's image encoder (ViTDet) and DeepSeek-VL-hybrid's down-sampler after it.

The blocks work on the grid channels-last ([n x h x w x c]) as SAM does, so windows are cut and put back
by reshapes; attention goes through `scaled_dot_product_attention` with the decomposed relative positions
as its additive mask (they read the unscaled queries, as SAM computes them). Parameter names are
transformers' (`patch_embed.projection`, `pos_embed`, `layers.N.{layer_norm1, attn.{qkv, proj, rel_pos_h,
rel_pos_w}, layer_norm2, mlp.{lin1, lin2}}`, `neck.{conv1, layer_norm1, conv2, layer_norm2}`), so a
`SamVisionModel` folder loads by key; DeepSeek-VL's extra modules are `global_neck`, `downsample.{conv1,
conv2}` and `alpha` (its `high_res_vision_neck`, `high_res_vision_proj`, `high_res_vision_alpha`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.sam import DOWNSAMPLE_UPSCALE, Sam
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, VisualTokens, activation
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart

#: the neck's LayerNorm epsilon (fixed in SAM and in transformers)
NECK_EPS = 1e-6


class ChannelsFirstNorm(nn.LayerNorm):
    """LayerNorm over the channels of an [n x c x h x w] map (SAM's `LayerNorm2d`)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Neck(nn.Module):
    """[n x h x w x width] -> [n x neck x h x w]: 1 x 1 conv, LayerNorm, 3 x 3 conv, LayerNorm, no biases."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, out, 1, bias=False)
        self.layer_norm1 = ChannelsFirstNorm(out, eps=NECK_EPS)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.layer_norm2 = ChannelsFirstNorm(out, eps=NECK_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(x.permute(0, 3, 1, 2)))))


class Downsample(nn.Module):
    """DeepSeek-VL's [n x c x h x w] -> [n x 4c x N x N]: bilinear resize to 4N x 4N, two 3 x 3 stride-2 convs."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * channels, 4 * channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = DOWNSAMPLE_UPSCALE * self.side
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class Attention(nn.Module):
    """Multi-head attention over an [n x h x w x c] grid (a window or the whole image) with SAM's decomposed
    relative positions for a `side` x `side` grid."""

    def __init__(self, cfg: Sam, side: int):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.qkv = nn.Linear(w, 3 * w, bias=cfg.attn_bias)
        self.proj = nn.Linear(w, w)
        head = w // cfg.heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head)) if cfg.rel_pos else None
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head)) if cfg.rel_pos else None

    def init_weights(self, std: float) -> None:
        for p in (self.rel_pos_h, self.rel_pos_w):
            if p is not None:
                nn.init.zeros_(p)  # as SAM starts them

    @staticmethod
    def _table(rel: Tensor, size: int) -> Tensor:
        """[size x size x d]: the table's row for each (query, key) offset along one axis."""
        idx = torch.arange(size, device=rel.device)
        return rel[idx[:, None] - idx[None, :] + (rel.shape[0] - 1) // 2]

    def _bias(self, q: Tensor, h: int, w: int) -> Tensor:
        """[b x heads x hw x hw]: q . R_h[qh, kh] + q . R_w[qw, kw], from the unscaled queries."""
        b, heads, _, d = q.shape
        rh, rw = self._table(self.rel_pos_h, h), self._table(self.rel_pos_w, w)
        grid = q.reshape(b * heads, h, w, d)
        along_h = torch.einsum("bhwc,hkc->bhwk", grid, rh.to(q.dtype))
        along_w = torch.einsum("bhwc,wkc->bhwk", grid, rw.to(q.dtype))
        bias = along_h[:, :, :, :, None] + along_w[:, :, :, None, :]
        return bias.reshape(b, heads, h * w, h * w)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = self._bias(q, h, w) if self.rel_pos_h is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Block(nn.Module):
    """Pre-norm block; a windowed one cuts the (zero-padded) grid into windows around its attention."""

    def __init__(self, cfg: Sam, window: int):
        super().__init__()
        self.window = window
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg, window or cfg.grid)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer_norm1(x)
        if self.window:
            h = self._windowed(h)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.layer_norm2(x))

    def _windowed(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        s = self.window
        ph, pw = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hh, ww = (h + ph) // s, (w + pw) // s
        win = x.reshape(n, hh, s, ww, s, c).permute(0, 1, 3, 2, 4, 5).reshape(n * hh * ww, s, s, c)
        out = self.attn(win).reshape(n, hh, ww, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hh * s, ww * s, c)
        return out[:, :h, :w]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Sam):
        super().__init__()
        self.projection = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.projection(pixels).permute(0, 2, 3, 1)


class SamEncoder(nn.Module, CheckpointedBlocks):
    """SAM's image encoder -> the neck's map (or the down-sampler's) as tokens, row by row, with its grid."""

    def __init__(self, cfg: Sam):
        super().__init__()
        self.cfg = cfg
        g = cfg.grid
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.width)) if cfg.abs_pos else None
        win = cfg.window_patches
        self.layers = nn.ModuleList([Block(cfg, 0 if i in cfg.global_layers else win) for i in range(cfg.depth)])
        self.neck = Neck(cfg.width, cfg.neck)
        self.downsample = Downsample(cfg.neck, cfg.downsample) if cfg.downsample else None
        tapped = cfg.downsample and cfg.global_neck is not None
        self.global_neck = Neck(cfg.width, cfg.neck) if tapped else None
        self.alpha = nn.Parameter(torch.zeros(1)) if tapped else None

    @property
    def image_dims(self) -> int:
        return 3

    def init_weights(self, std: float) -> None:
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=std)
        if self.alpha is not None:
            nn.init.zeros_(self.alpha)  # DeepSeek-VL starts the second branch switched off

    def spec_parts(self) -> list[SpecPart]:
        parts = [SpecPart("embeddings", [self.patch_embed, self.pos_embed], GROUP),
                 SpecPart("layers", [self.layers], GROUP), SpecPart("neck", [self.neck], GROUP),
                 SpecPart("attn", [b.attn for b in self.layers]), SpecPart("mlp", [b.mlp for b in self.layers])]
        if self.downsample is not None:
            parts.append(SpecPart("downsample", [self.downsample, self.global_neck, self.alpha], GROUP))
        return parts

    def _check(self, pixels: Tensor) -> None:
        cfg = self.cfg
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise user_error("E0577", f"images for sam encoder are {tuple(pixels.shape)}; it takes [batch x "
                             f"{cfg.channels} x {cfg.image_size} x {cfg.image_size}] (its absolute positions are "
                             "one per patch of that square)",
                             help="feed the images through the spec's processor, which fits them to image_size")

    def forward(self, pixels: Tensor) -> VisualTokens:
        self._check(pixels)
        x = self.patch_embed(pixels.to(self.patch_embed.projection.weight.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        tapped = None
        for i, block in enumerate(self.layers):
            x = self.run_block(block, x)
            if i == self.cfg.global_neck:
                tapped = x
        out = self.neck(x)
        if self.downsample is not None:
            out = self.downsample(out)
            if self.global_neck is not None and tapped is not None:
                out = out + self.downsample(self.global_neck(tapped)) * self.alpha
        grid = (out.shape[-2], out.shape[-1])
        return VisualTokens(out.flatten(2).transpose(1, 2), grid)


@register("vision", "sam")
def build_sam(comp: Component, ctx: BuildContext) -> SamEncoder:
    return SamEncoder(comp.config)

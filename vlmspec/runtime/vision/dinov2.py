"""`dinov2`: DINOv2 and DINOv2 with registers.

Its own module rather than a switch in `encoder.VisionEncoder` because the two differ where a switch
would not help: DINOv2's learned positions are resized to every image's grid (any size, any aspect
ratio), the register tokens sit between the class token and the patches without positions, and the
parameter names are transformers' `Dinov2Model`'s (`embeddings.patch_embeddings.projection`,
`encoder.layer.N.attention.attention.query`, `layer_scale1.lambda1`, `layernorm`), so a
`save_pretrained` folder loads by key with no renaming. The MLP (`fc1` / `fc2`) is the shared
`VisionMLP`; ViT-g's SwiGLU keeps its checkpoint's fused `weights_in`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.dinov2 import DINOv2
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import (
    CheckpointedBlocks,
    VisualTokens,
    activation,
    attend,
    check_divisible,
    split_heads,
)
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart
from vlmspec.runtime.vision.encoder import VisionMLP


class PatchEmbeddings(nn.Module):
    """The patch convolution, under transformers' `patch_embeddings.projection` key."""

    def __init__(self, cfg: DINOv2):
        super().__init__()
        p = cfg.patch_size
        self.projection = nn.Conv2d(cfg.channels, cfg.width, p, p, bias=cfg.patch_bias)


class Dinov2Embeddings(nn.Module):
    """Class token + patches + positions (resized to the grid), then the register tokens after the class
    token. Raw `[1 x n x w]` parameters, as DINOv2 checkpoints store them."""

    def __init__(self, cfg: DINOv2):
        super().__init__()
        w = cfg.width
        self.grid = cfg.position_grid
        self.antialias = cfg.resize_antialias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, w))  # pre-training only: masked patches
        if cfg.registers > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, w))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, w))

    def init_weights(self, std: float) -> None:
        for p in (self.cls_token, self.position_embeddings, getattr(self, "register_tokens", None)):
            if p is not None:
                nn.init.normal_(p, std=std)
        if hasattr(self, "mask_token"):
            nn.init.zeros_(self.mask_token)

    def positions(self, gh: int, gw: int) -> Tensor:
        """[1 x (1 + gh*gw) x w]: the class token's position, then the patch grid resized (in float32) from the
        trained square grid when it differs."""
        pos = self.position_embeddings
        if (gh, gw) == (self.grid, self.grid):
            return pos
        cls, grid = pos[:, :1], pos[:, 1:]
        g = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()
        g = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False, antialias=self.antialias)
        g = g.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls, g], dim=1)

    def forward(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.patch_embeddings.projection(pixels)
        gh, gw = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positions(gh, gw).to(x.dtype)
        registers = getattr(self, "register_tokens", None)
        if registers is not None:
            x = torch.cat([x[:, :1], registers.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return x, (gh, gw)


class SelfAttention(nn.Module):
    """q / k / v under transformers' `attention.attention.{query,key,value}`."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.query = nn.Linear(width, width, bias=bias)
        self.key = nn.Linear(width, width, bias=bias)
        self.value = nn.Linear(width, width, bias=bias)


class AttentionOutput(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)


class Dinov2Attention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.attention = SelfAttention(width, bias)
        self.output = AttentionOutput(width)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attention
        q, k, v = (split_heads(t, self.heads) for t in (a.query(x), a.key(x), a.value(x)))
        return self.output.dense(attend(q, k, v))


class SwiGLU(nn.Module):
    """ViT-g's FFN as its checkpoints store it: `weights_in` holds the gate's rows, then the up projection's;
    the gate's activation is the spec's `act` (silu unless it says otherwise, as in ViT-g)."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.weights_in = nn.Linear(width, 2 * hidden)
        self.weights_out = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(self.act(gate) * up)


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(width))

    def init_weights(self, std: float) -> None:
        nn.init.ones_(self.lambda1)  # transformers' `layerscale_value` default

    def forward(self, x: Tensor) -> Tensor:
        return self.lambda1.to(x.dtype) * x


class Dinov2Layer(nn.Module):
    """Pre-LN block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: DINOv2):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.attention = Dinov2Attention(w, cfg.heads, cfg.attn_bias)
        self.norm2 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp: nn.Module = SwiGLU(w, cfg.mlp_dim, cfg.act) if cfg.gated_mlp else VisionMLP(w, cfg.mlp_dim, cfg.act)
        if cfg.layer_scale:
            self.layer_scale1 = LayerScale(w)
            self.layer_scale2 = LayerScale(w)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attention(self.norm1(x))
        if hasattr(self, "layer_scale1"):
            a = self.layer_scale1(a)
        x = x + a
        f = self.mlp(self.norm2(x))
        if hasattr(self, "layer_scale2"):
            f = self.layer_scale2(f)
        return x + f


class Dinov2Stack(nn.Module):
    def __init__(self, layers: list[Dinov2Layer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class Dinov2Encoder(nn.Module, CheckpointedBlocks):
    """DINOv2 returning the hidden states the spec selects (`feature`), at any image size whose sides hold a
    patch: positions are resized to the image's grid. `patches` drops the class and register tokens."""

    def __init__(self, cfg: DINOv2):
        super().__init__()
        check_divisible(cfg.width, cfg.heads, "vision encoder")
        self.cfg = cfg
        self.embeddings = Dinov2Embeddings(cfg)
        self.encoder = Dinov2Stack([Dinov2Layer(cfg) for _ in range(cfg.depth)])
        if cfg.post_norm:
            self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.selected = [i if i >= 0 else cfg.depth + 1 + i for i in cfg.feature.layers]
        self.prefix = 1 + max(cfg.registers, 0)  # class token and registers

    @property
    def image_dims(self) -> int:
        return 3

    def spec_parts(self) -> list[SpecPart]:
        layers = list(self.encoder.layer)
        return [SpecPart("embeddings", [self.embeddings], GROUP), SpecPart("layers", [self.encoder.layer], GROUP),
                SpecPart("attn", [layer.attention for layer in layers]),
                SpecPart("mlp", [layer.mlp for layer in layers]),
                SpecPart("norm", [getattr(self, "layernorm", None)])]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        for layer in self.encoder.layer:
            a = layer.attention
            for target, linear in (("attn.q", a.attention.query), ("attn.k", a.attention.key),
                                   ("attn.v", a.attention.value), ("attn.o", a.output.dense)):
                out.setdefault(target, []).append(linear)
            mlp = layer.mlp
            out.setdefault("mlp.fc1", []).append(mlp.weights_in if isinstance(mlp, SwiGLU) else mlp.fc1)
            out.setdefault("mlp.fc2", []).append(mlp.weights_out if isinstance(mlp, SwiGLU) else mlp.fc2)
        return out

    def _check(self, pixels: Tensor) -> None:
        cfg = self.cfg
        if pixels.dim() != 4:
            raise user_error("E0588", f"images for a dinov2 encoder must be [batch x channels x height x width], got "
                             f"shape {tuple(pixels.shape)}")
        c, h, w = pixels.shape[-3:]
        if c != cfg.channels or h < cfg.patch_size or w < cfg.patch_size:
            raise user_error("E0588", f"images are {c} x {h} x {w}; this dinov2 encoder takes {cfg.channels} "
                             f"channels and sides of at least one {cfg.patch_size}-pixel patch",
                             help=f"the spec's processor feeds {cfg.channels} x {cfg.image_size} x {cfg.image_size}")

    def forward(self, pixels: Tensor) -> VisualTokens:
        """[n x c x H x W] -> tokens [n x t x (w * selected layers)] on the (H/p) x (W/p) grid."""
        self._check(pixels)
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        x, grid = self.embeddings(pixels.to(dtype))
        states = {0: x}
        last = max(self.selected)
        for i, layer in enumerate(self.encoder.layer[:last]):
            x = self.run_block(layer, x)
            states[i + 1] = x
        if self.cfg.feature_norm and self.cfg.post_norm and last == self.cfg.depth:
            states[last] = self.layernorm(states[last])
        feats = [states[i] for i in self.selected]
        out = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        if self.cfg.feature.tokens == "patches":
            return VisualTokens(out[:, self.prefix:], grid)
        return VisualTokens(out, None)


@register("vision", "dinov2")
def build_dinov2(comp: Component, ctx: BuildContext) -> Dinov2Encoder:
    return Dinov2Encoder(comp.config)

"""Vision encoder `sam`: SAM's image encoder (ViTDet), the high-resolution tower of DeepSeek-VL's hybrid.

A ViT over a fixed square image (1024 px in 16-pixel patches: a 64 x 64 grid) with no class token and
absolute positions added as a grid; most blocks attend within square windows (padded at the grid's edge)
and the `global_layers` attend over the whole grid; each attention adds decomposed relative positions
(a table per axis, as in MViTv2). A neck of two bias-free convolutions with channels-first LayerNorms
turns the grid into `neck` channels. DeepSeek-VL-hybrid adds a down-sampler (`downsample`): the map is
resized bilinearly to 4N x 4N and two 3 x 3 stride-2 convolutions bring it to N x N with four times the
channels, so that its grid meets the low-resolution tower's; and (`global_neck`) the output of one block
through a second neck and the same down-sampler, scaled by a learned alpha, joins it. Parameter names and
counts follow transformers' `SamVisionModel` and `DeepseekVLHybridModel`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vlmspec.compiler.schema.base import (
    ComponentSchema,
    Dtype,
    Quantize,
    ShapeContext,
    TokenShape,
    layernorm,
    linear,
    register,
)
from vlmspec.compiler.schema.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from vlmspec.compiler.schema.square import FixedSquare

#: DeepSeek-VL's down-sampler resizes the neck's map to this many times the target grid before its two
#: stride-2 convolutions halve it twice
DOWNSAMPLE_UPSCALE = 4


@register
class Sam(FixedSquare, ComponentSchema):
    """SAM / ViTDet image encoder: windowed + global attention, relative positions, a conv neck."""

    role = "vision"
    kind = "sam"
    summary = "SAM / ViTDet encoder: windowed + global attention, conv neck, optional down-sampler (DeepSeek-VL)"
    checkpointable = True
    image_size: int = Field(default=1024, gt=0, description="input resolution in pixels (square; the absolute "
                            "positions are a grid of this size)")
    patch_size: int = Field(default=16, gt=0, description="patch side in pixels")
    channels: int = Field(default=3, gt=0, description="input channels")
    width: int = Field(default=768, gt=0, description="hidden size")
    depth: int = Field(default=12, gt=0, description="number of transformer blocks")
    heads: int = Field(default=12, gt=0, description="attention heads")
    mlp: int | None = Field(default=None, gt=0, description="MLP hidden size (default: 4 x width)")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu", description="MLP activation")
    norm_eps: float = Field(default=1e-6, gt=0, description="the blocks' LayerNorm epsilon (the neck's: 1e-6)")
    attn_bias: bool = Field(default=True, description="bias on the fused qkv projection (transformers' `qkv_bias`)")
    abs_pos: bool = Field(default=True, description="learned absolute positions, one per patch of the grid")
    rel_pos: bool = Field(default=True, description="decomposed relative positions in every attention: a "
                          "learned table per axis, (2 x side - 1) x head width, side = the window's or the grid's")
    window: int = Field(default=224, ge=0, description="window attention: blocks not in `global_layers` attend "
                        "within square windows of N pixels (N / patch_size patches a side, from the top-left; the "
                        "grid is padded to whole windows); 0: every block attends over the whole grid")
    global_layers: list[int] = Field(default=[2, 5, 8, 11], description="blocks (0-based) that attend over the "
                                     "whole grid (SAM ViT-B: [2, 5, 8, 11])")
    neck: int = Field(default=256, gt=0, description="channels out of the neck (1 x 1 conv, LayerNorm, 3 x 3 "
                      "conv, LayerNorm; transformers' `output_channels`)")
    downsample: int = Field(default=0, ge=0, description="DeepSeek-VL's down-sampler: the neck's map resized "
                            "bilinearly to 4N x 4N, then two 3 x 3 stride-2 convolutions (2 x and 4 x neck "
                            "channels): an N x N grid of 4 x neck wide tokens (0: none, the neck's grid leaves)")
    global_neck: int | None = Field(default=None, ge=0, description="DeepSeek-VL: block N's output also passes "
                                    "through a second neck and the down-sampler, is scaled by a learned alpha "
                                    "(starting at 0) and added (transformers reads its first global layer, 2)")
    mean: list[float] = Field(default=IMAGENET_MEAN, min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=IMAGENET_STD, min_length=1, description="per-channel normalisation std")
    resize: Literal["bicubic", "bilinear", "nearest", "lanczos"] = Field(default="bicubic",
                                                                          description="resize filter")
    fit: Literal["stretch", "pad"] = Field(default="pad", description="how an image of another aspect ratio "
                                           "becomes square: `pad` resizes its longer side to image_size and "
                                           "centres it on a square of the mean colour (DeepSeek-VL's "
                                           "processor); `stretch` resizes it to image_size x image_size")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this encoder from")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    @property
    def mlp_dim(self) -> int:
        return self.mlp if self.mlp is not None else 4 * self.width

    @property
    def grid(self) -> int:
        """Patches a side of the encoder's grid (before any down-sampler)."""
        return self.image_size // self.patch_size

    @property
    def window_patches(self) -> int:
        return self.window // self.patch_size

    @property
    def out_grid(self) -> int:
        """Tokens a side of what leaves: the down-sampler's grid, else the encoder's."""
        return self.downsample or self.grid

    @property
    def out_width(self) -> int:
        return 4 * self.neck if self.downsample else self.neck

    def check(self, ctx: ShapeContext) -> None:
        if self.image_size % self.patch_size:
            lo = self.image_size // self.patch_size * self.patch_size
            ctx.sink.error("E0266", f"image_size {self.image_size} is not a whole number of {self.patch_size}-pixel "
                           "patches: SAM's absolute positions are one per patch of a square grid",
                           ctx.span_of("image_size"),
                           help=f"use image_size = {lo + self.patch_size}" + (f" or {lo}" if lo else ""))
        if self.window % self.patch_size:
            lo = self.window // self.patch_size * self.patch_size
            ctx.sink.error("E0266", f"window = {self.window} pixels is not a whole number of {self.patch_size}-pixel "
                           "patches", ctx.span_of("window"),
                           help=f"use window = {lo + self.patch_size}" + (f" or {lo}" if lo else "")
                           + " (SAM: 14 patches, 224 pixels at patch_size 16)")
        bad = [i for i in self.global_layers if not 0 <= i < self.depth]
        twice = sorted({i for i in self.global_layers if self.global_layers.count(i) > 1})
        if bad or twice:
            what = (f"block {bad[0]} is not one of the {self.depth} blocks" if bad
                    else f"block {twice[0]} is listed twice")
            ctx.sink.error("E0266", f"global_layers: {what}", ctx.span_of("global_layers"),
                           help=f"blocks are numbered 0..{self.depth - 1}, each listed once")
        if self.width % self.heads:
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            ctx.sink.error("E0201", f"mean and std need {self.channels} values (one per channel)", ctx.span_of("mean"))
        if self.global_neck is not None:
            if not self.downsample:
                ctx.sink.error("E0267", "global_neck adds a block's output after the down-sampler, and this encoder "
                               "has none", ctx.span_of("global_neck"),
                               help="set `downsample` (the grid side the other encoder has), or drop `global_neck`")
            elif self.global_neck >= self.depth:
                ctx.sink.error("E0267", f"global_neck = {self.global_neck} is not one of the {self.depth} blocks",
                               ctx.span_of("global_neck"), help=f"blocks are numbered 0..{self.depth - 1} "
                               "(DeepSeek-VL reads its first global layer)")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return TokenShape(max(self.out_grid, 0) ** 2, self.out_width)

    def rel_pos_params(self, layer: int) -> int:
        """Block `layer`'s two relative-position tables: (2 x side - 1) rows of one head's width each."""
        if not self.rel_pos:
            return 0
        side = self.grid if (layer in self.global_layers or not self.window) else self.window_patches
        return 2 * (2 * side - 1) * (self.width // max(self.heads, 1))

    def attn_params(self) -> int:
        w = self.width
        return linear(w, 3 * w, self.attn_bias) + linear(w, w)

    def mlp_params(self) -> int:
        return linear(self.width, self.mlp_dim) + linear(self.mlp_dim, self.width)

    def neck_params(self) -> int:
        n = self.neck
        return self.width * n + layernorm(n) + 9 * n * n + layernorm(n)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w = self.width
        embed = self.channels * self.patch_size**2 * w + w + (self.grid**2 * w if self.abs_pos else 0)
        block = self.attn_params() + self.mlp_params() + 2 * layernorm(w)
        out = {"embeddings": embed,
               "layers": self.depth * block + sum(self.rel_pos_params(i) for i in range(self.depth)),
               "neck": self.neck_params()}
        if self.downsample:
            n = self.neck
            down = 9 * n * 2 * n + 9 * 2 * n * 4 * n
            if self.global_neck is not None:
                down += self.neck_params() + 1  # the second neck and alpha
            out["downsample"] = down
        return out

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "attn":
            return self.depth * self.attn_params() + sum(self.rel_pos_params(i) for i in range(self.depth))
        if sub == "mlp":
            return self.depth * self.mlp_params()
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        return ["embeddings", "layers", "attn", "mlp", "neck", *(["downsample"] if self.downsample else [])]

    def lora_targets(self) -> list[str]:
        """None: the attention's q, k and v are one fused projection, which the LoRA targets of the other ViTs
        (`attn.q`, `attn.k`, `attn.v`) cannot name; a stage trains or freezes a SAM tower whole or by part."""
        return []

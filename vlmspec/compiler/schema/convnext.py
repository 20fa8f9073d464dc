"""Vision encoder `convnext`: ConvNeXt, the convolutional tower ConvLLaVA reads images through.

A 4 x 4 / 4 stem convolution with a LayerNorm, then stages of depthwise 7 x 7 convolution blocks
(LayerNorm, a pointwise 4x MLP, layer scale), each stage after the first opening with a LayerNorm and a
2 x 2 / 2 down-sampling convolution. Its tokens are one stage's feature map read row by row: h x w tokens
as wide as that stage. `dims` and `depths` may be any (equal) length: ConvLLaVA adds a fifth stage to
halve the token count again. Parameter names and counts follow transformers' `ConvNextModel`.
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

#: ConvNeXt's depthwise kernel side and MLP expansion (fixed in the architecture and in transformers' config)
KERNEL = 7
EXPANSION = 4


@register
class ConvNeXt(FixedSquare, ComponentSchema):
    """ConvNeXt: a stem, stages of depthwise-conv blocks, down-sampling between stages."""

    role = "vision"
    kind = "convnext"
    summary = "ConvNeXt: convolution stages; tokens are one stage's feature map (ConvLLaVA)"
    checkpointable = True
    image_size: int = Field(default=224, gt=0, description="input resolution in pixels (square)")
    patch_size: int = Field(default=4, gt=0, description="stem convolution's kernel and stride in pixels")
    channels: int = Field(default=3, gt=0, description="input channels")
    dims: list[int] = Field(default=[96, 192, 384, 768], min_length=1, description="channels of each stage")
    depths: list[int] = Field(default=[3, 3, 9, 3], min_length=1, description="blocks in each stage")
    out_stage: int = Field(default=-1, description="the stage whose feature map leaves as tokens (0-based; "
                       "negative counts from the last)")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu", description="MLP activation")
    layer_scale: bool = Field(default=True, description="learned per-channel scale on each block's output "
                              "before it joins the residual (`layer_scale_parameter`)")
    norm_eps: float = Field(default=1e-12, gt=0, description="epsilon of the final LayerNorm (transformers' "
                            "`layer_norm_eps`; the stem's and blocks' LayerNorms use 1e-6)")
    feature_norm: bool = Field(default=False, description="the last stage's tokens pass through the final "
                               "LayerNorm (transformers applies it to the pooled output only)")
    mean: list[float] = Field(default=IMAGENET_MEAN, min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=IMAGENET_STD, min_length=1, description="per-channel normalisation std")
    resize: Literal["bicubic", "bilinear", "nearest", "lanczos"] = Field(default="bicubic",
                                                                          description="resize filter")
    fit: Literal["stretch", "crop", "pad"] = Field(default="stretch", description="how an image of another aspect "
                                                   "ratio becomes square: `stretch`, `crop` (the centre after "
                                                   "resizing the shorter side) or `pad` (with the mean colour)")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this encoder from")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    @property
    def stage_index(self) -> int:
        """The selected stage, 0-based."""
        return self.out_stage if self.out_stage >= 0 else len(self.dims) + self.out_stage

    @property
    def stride(self) -> int:
        """Pixels per token side at the selected stage."""
        return self.patch_size * 2 ** self.stage_index

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    def check(self, ctx: ShapeContext) -> None:
        n = len(self.dims)
        if len(self.depths) != n:
            ctx.sink.error("E0240", f"dims has {n} stages but depths has {len(self.depths)}", ctx.span_of("depths"),
                           help="give one depth per stage, e.g. dims = [192, 384, 768, 1536] with "
                           "depths = [3, 3, 27, 3]")
        bad = [v for v in (*self.dims, *self.depths) if v <= 0]
        if bad:
            where = "dims" if any(v <= 0 for v in self.dims) else "depths"
            ctx.sink.error("E0240", f"{where} holds {bad[0]}: every stage needs a positive width and depth",
                           ctx.span_of(where), help="channels and block counts are whole numbers > 0")
        if not -n <= self.out_stage < n:
            ctx.sink.error("E0244", f"out_stage = {self.out_stage} is not one of the {n} stages",
                           ctx.span_of("out_stage"), help=f"stages are numbered 0..{n - 1} (or -1..-{n} from the last)")
            return
        if self.feature_norm and self.stage_index != n - 1:
            ctx.sink.error("E0244", "feature_norm normalises the last stage's tokens; "
                           f"out_stage = {self.out_stage} reads stage {self.stage_index} of {n}",
                           ctx.span_of("feature_norm"),
                           help="drop `feature_norm`, or read the last stage (`out_stage = -1`)")
        if self.image_size % self.stride:
            lo = self.image_size // self.stride * self.stride
            ctx.sink.error("E0243", f"image_size {self.image_size} is not a multiple of {self.stride}, the stride of "
                           f"stage {self.stage_index} (patch_size {self.patch_size} x 2^{self.stage_index})",
                           ctx.span_of("image_size"),
                           help=f"use image_size = {lo + self.stride}" + (f" or {lo}" if lo else ""))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            ctx.sink.error("E0201", f"mean and std need {self.channels} values (one per channel)", ctx.span_of("mean"))

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        i = min(max(self.stage_index, 0), len(self.dims) - 1)
        return TokenShape(max(self.grid, 0) ** 2, self.dims[i])

    def block_params(self, d: int) -> int:
        """One block: depthwise conv, LayerNorm, the two pointwise linears, the layer scale."""
        return (KERNEL * KERNEL * d + d + layernorm(d) + linear(d, EXPANSION * d) + linear(EXPANSION * d, d)
                + (d if self.layer_scale else 0))

    def stage_params(self, i: int) -> int:
        """Stage i: (after the first) LayerNorm over the previous width and the 2 x 2 / 2 convolution, then its
        blocks."""
        dims, d = self.dims, self.dims[i]
        down = layernorm(dims[i - 1]) + 2 * 2 * dims[i - 1] * d + d if i else 0
        return down + self.depths[i] * self.block_params(d)

    @property
    def n_stages(self) -> int:
        return min(len(self.dims), len(self.depths))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        dims = self.dims
        stem = self.channels * self.patch_size**2 * dims[0] + dims[0] + layernorm(dims[0])
        stages = sum(self.stage_params(i) for i in range(self.n_stages))
        return {"embeddings": stem, "stages": stages, "norms": layernorm(dims[-1])}

    def mlp_params(self) -> int:
        return sum(n * (linear(d, EXPANSION * d) + linear(EXPANSION * d, d))
                   for d, n in zip(self.dims, self.depths, strict=False))

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "mlp":
            return self.mlp_params()
        if sub == "norm":
            return parts.get("norms", 0)
        if sub.startswith("stage") and sub[5:].isdigit() and int(sub[5:]) < self.n_stages:
            return self.stage_params(int(sub[5:]))
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        # `stage0`, `stage1`, ...: ConvLLaVA trains the later stages of its tower and keeps the first ones
        return ["embeddings", "stages", *(f"stage{i}" for i in range(self.n_stages)), "mlp", "norm"]

    def lora_targets(self) -> list[str]:
        """None: the blocks' widths differ from stage to stage, which LoRA's per-layer count (width x depth)
        cannot say; a stage trains a ConvNeXt's stages instead."""
        return []

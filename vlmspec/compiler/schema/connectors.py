"""Connectors: what turns encoder features into tokens the language model (or a fusion) consumes.

Each kind says how many tokens and what width it emits (`out_shape`) and how many parameters it
holds (`params`), in closed form, so nothing is allocated to check or summarise a spec.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from vlmspec.compiler.schema.base import (
    MAX_LAYERS,
    ComponentSchema,
    Dtype,
    Quantize,
    ShapeContext,
    TokenShape,
    layernorm,
    linear,
    register,
)

Act = Literal["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"]


class ConnectorBase(ComponentSchema):
    role = "connector"
    merge: Literal["concat", "sum", "sequence"] = Field(
        default="concat", description="how several sources combine: along width, summed, or along the sequence")
    out: int | None = Field(default=None, gt=0, description="output width (default: what the consumer expects)")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this connector from")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    def merged_input(self, ctx: ShapeContext) -> TokenShape:
        """The single input this connector sees once its sources are merged."""
        ins = ctx.inputs
        if not ins:
            return TokenShape(0, 0)
        if len(ins) == 1:
            return ins[0]
        dynamic = any(s.dynamic for s in ins)
        if self.merge == "sequence":
            widths = {s.width for s in ins}
            if len(widths) > 1:
                ctx.sink.error("E0203", f"merge = sequence needs sources of one width, got {sorted(widths)}",
                               ctx.span_of("merge"), help="use `merge = concat`, or put a connector on each source")
            return TokenShape(sum(s.tokens for s in ins), ins[0].width, dynamic)
        tokens = {s.tokens for s in ins}
        if len(tokens) > 1:
            ctx.sink.error("E0204", f"merge = {self.merge} needs sources with the same token count, got "
                           + " and ".join(str(s.tokens) for s in ins), ctx.span_of("merge"),
                           help="use `merge = sequence` to concatenate along the sequence instead")
        if self.merge == "sum":
            widths = {s.width for s in ins}
            if len(widths) > 1:
                ctx.sink.error("E0203", f"merge = sum needs sources of one width, got {sorted(widths)}",
                               ctx.span_of("merge"), help="use `merge = concat` to stack them along width")
            return TokenShape(ins[0].tokens, ins[0].width, dynamic)
        return TokenShape(ins[0].tokens, sum(s.width for s in ins), dynamic)

    def laid_out(self, x: TokenShape, per_tile: TokenShape) -> TokenShape:
        """This connector's output for input `x`, given its output for one tile (or image): when `x` comes
        from an encoder with an image layout, the most tokens any image can take, with the tile's count
        (what the processor multiplies by each image's tiles); else `per_tile` itself."""
        if x.layout is None:
            return per_tile
        layout, size, patch = x.layout
        most = layout.token_range(size, patch, per_tile.tokens)[1]
        return TokenShape(most, per_tile.width, True, x.layout, per_tile.tokens)

    def out_width(self, ctx: ShapeContext, natural: int) -> int:
        if self.out is not None:
            return self.out
        return ctx.target_width if ctx.target_width is not None else natural

    def check(self, ctx: ShapeContext) -> None:
        return None

    def pooled(self, ctx: ShapeContext, factor: int, field: str) -> TokenShape:
        """The input with every `factor x factor` block of the patch grid reduced to one token."""
        x = self.merged_input(ctx)
        if not x.dynamic:
            _square_grid(ctx, x.tokens, factor, field)
        return TokenShape(x.tokens // (factor**2), self.out_width(ctx, x.width), x.dynamic)

    def subpaths(self) -> list[str]:
        return []

    def lora_targets(self) -> list[str]:
        return []


def _mlp_params(d_in: int, hidden: int | list[int], d_out: int, layers: int) -> int:
    dims = [d_in, *hidden_widths(hidden, layers), d_out]
    return sum(linear(a, b) for a, b in zip(dims, dims[1:], strict=False))


def hidden_widths(hidden: int | list[int], layers: int) -> list[int]:
    """The widths between an MLP's linear layers: one width repeated, or one per hidden layer as given."""
    if isinstance(hidden, list):
        return list(hidden)
    return [hidden] * (layers - 1)


@register
class Linear(ConnectorBase):
    """One linear projection (LLaVA-1, PaliGemma, MiniGPT-4); MiniGPT-v2 first concatenates every 4
    consecutive tokens into one (`group = 4`)."""

    kind = "linear"
    summary = "a single linear projection"
    bias: bool = Field(default=True, description="learn a bias")
    group: int = Field(default=1, ge=1, description="concatenate each run of N consecutive tokens (in sequence "
                       "order) into one before projecting: N times fewer tokens, N times the width (MiniGPT-v2: 4)")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = self.merged_input(ctx)
        if x.tokens % self.group and not x.dynamic:
            ctx.sink.error("E0205", f"{x.tokens} visual tokens are not divisible by group = {self.group}",
                           ctx.span_of("group"), help="pick a group that divides the token count, or select "
                           "`.patches` on the encoder so the class token is dropped")
        return self.laid_out(x, TokenShape(x.tokens // self.group,
                                           self.out_width(ctx, x.width * self.group), x.dynamic))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        return {"proj": linear(x.width * self.group, self.out_width(ctx, x.width * self.group), self.bias)}


@register
class MLP(ConnectorBase):
    """N linear layers with an activation between them (LLaVA-1.5's `mlp2x_gelu`)."""

    kind = "mlp"
    summary = "an N-layer MLP (LLaVA-1.5's mlp2x_gelu)"
    layers: int = Field(default=2, ge=1, le=16, description="number of linear layers")
    act: Act = Field(default="gelu", description="activation between layers")
    hidden: int | list[int] | None = Field(
        default=None, description="hidden width (default: the output width), or one width per hidden layer: "
        "`hidden = [8704, 2560]` with `layers = 3` (prismatic's fused-gelu-mlp)")
    norm: bool = Field(default=False, description="LayerNorm on the input first")

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if v is not None and any(w <= 0 for w in (v if isinstance(v, list) else [v])):
            raise ValueError("hidden widths must be positive")
        return v

    def check(self, ctx: ShapeContext) -> None:
        if isinstance(self.hidden, list) and len(self.hidden) != self.layers - 1:
            n = self.layers - 1
            ctx.sink.error("E0237", f"`hidden` lists {len(self.hidden)} widths, but {self.layers} layers have "
                           f"{n} hidden {'width' if n == 1 else 'widths'} between them", ctx.span_of("hidden"),
                           help=f"give {n} {'width' if n == 1 else 'widths'}, or set `layers = {len(self.hidden) + 1}`")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = self.merged_input(ctx)
        return self.laid_out(x, TokenShape(x.tokens, self.out_width(ctx, x.width), x.dynamic))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        out = self.out_width(ctx, x.width)
        hidden = self.hidden or out
        p = {"mlp": _mlp_params(x.width, hidden, out, self.layers)}
        if self.norm:
            p["norm"] = layernorm(x.width)
        if x.layout is not None and getattr(x.layout[0], "newline", False):
            p["newline"] = out  # LLaVA-NeXT's `image_newline`, in the output width
        return p


@register
class QFormer(ConnectorBase):
    """BLIP-2's Q-Former: learned queries read the image through cross-attention every other layer."""

    kind = "qformer"
    checkpointable = True
    summary = "BLIP-2 Q-Former: learned queries with cross-attention"
    queries: int = Field(default=32, gt=0, description="learned query tokens (= visual tokens out)")
    width: int = Field(default=768, gt=0, description="Q-Former hidden size")
    depth: int = Field(default=12, gt=0, le=MAX_LAYERS, description="Q-Former layers")
    heads: int = Field(default=12, gt=0, description="attention heads")
    mlp: int = Field(default=3072, gt=0, description="feed-forward hidden size")
    cross_every: int = Field(default=2, ge=1, description="a cross-attention block every N layers")
    instruction: bool = Field(default=False, description="instruction-aware (InstructBLIP): text tokens enter the Q-Former")
    text_ffn: bool = Field(default=True, description="keep the text-side feed-forward in each layer (HF Blip2 drops it)")
    text_vocab: int = Field(default=30523, gt=0, description="vocabulary of the text embeddings (instruction or first-stage text)")
    max_text: int = Field(default=512, gt=0, description="positions of the text embeddings")
    project: bool = Field(default=True, description="end with a linear projection to the output width")
    norm_eps: float = Field(default=1e-12, gt=0, description="LayerNorm epsilon")
    pretrain: bool = Field(default=False, description="BLIP-2's first-stage text side: text embeddings and the "
                           "ITC / ITM / ITG heads that the itc, itm and itg objectives train")
    embed_dim: int = Field(default=256, gt=0, description="width of the image-text contrastive space (with `pretrain`)")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return TokenShape(self.queries, self.out_width(ctx, self.width) if self.project else self.width)

    def check(self, ctx: ShapeContext) -> None:
        if self.width % self.heads:
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w, m = self.width, self.mlp
        enc = self.merged_input(ctx).width
        self_attn = 4 * linear(w, w) + layernorm(w)
        ffn = linear(w, m) + linear(m, w) + layernorm(w)
        cross = linear(w, w) + 2 * linear(enc, w) + linear(w, w) + layernorm(w)
        n_cross = sum(1 for i in range(self.depth) if i % self.cross_every == 0)
        p = {
            "queries": self.queries * w,
            "embeddings": layernorm(w) + ((self.text_vocab + self.max_text) * w if self.instruction else 0),
            "layers": self.depth * (self_attn + (2 if self.text_ffn else 1) * ffn) + n_cross * cross,
        }
        if self.pretrain:
            words = 0 if self.instruction else (self.text_vocab + self.max_text) * w
            itg = linear(w, w) + layernorm(w) + self.text_vocab  # transform + output bias (decoder tied)
            p["pretrain"] = words + 2 * linear(w, self.embed_dim) + linear(w, 2) + 1 + itg
        if self.project:
            p["proj"] = linear(w, self.out_width(ctx, w))
        return p

    def subpaths(self) -> list[str]:
        return ["queries", "layers", *(["pretrain"] if self.pretrain else []), *(["proj"] if self.project else [])]


@register
class Perceiver(ConnectorBase):
    """Flamingo's perceiver resampler: a fixed number of latents attend to all image features."""

    kind = "perceiver"
    checkpointable = True
    summary = "Flamingo perceiver resampler: N latents attend to the features"
    latents: int = Field(default=64, gt=0, description="latent tokens (= visual tokens out)")
    depth: int = Field(default=6, gt=0, description="resampler blocks")
    heads: int = Field(default=16, gt=0, description="attention heads")
    head_dim: int = Field(default=96, gt=0, description="width of one head")
    mlp_ratio: int = Field(default=4, gt=0, description="feed-forward width as a multiple of the input width")
    act: Act = Field(default="gelu", description="feed-forward activation (Flamingo: gelu, IDEFICS: relu)")
    qk_norm: bool = Field(default=False, description="LayerNorm on queries and keys per head (IDEFICS)")
    project: bool = Field(default=False, description="end with a linear projection to the output width")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        w = self.merged_input(ctx).width
        return TokenShape(self.latents, self.out_width(ctx, w) if self.project else w)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        d = self.merged_input(ctx).width
        inner = self.heads * self.head_dim
        attn = 2 * layernorm(d) + 3 * linear(d, inner, False) + linear(inner, d, False)
        if self.qk_norm:
            attn += 2 * layernorm(self.head_dim)
        ffn = layernorm(d) + linear(d, self.mlp_ratio * d, False) + linear(self.mlp_ratio * d, d, False)
        p = {"latents": self.latents * d, "layers": self.depth * (attn + ffn), "norm": layernorm(d)}
        if self.project:
            p["proj"] = linear(d, self.out_width(ctx, d))
        return p

    def subpaths(self) -> list[str]:
        return ["latents", "layers", *(["proj"] if self.project else [])]


def _square_grid(ctx: ShapeContext, tokens: int, factor: int, field: str) -> int | None:
    side = math.isqrt(tokens)
    if side * side != tokens:
        ctx.sink.error("E0205", f"{tokens} visual tokens do not form a square grid", ctx.span_of(field),
                       help="select `.patches` on the encoder so the class token is dropped")
        return None
    if side % factor:
        ctx.sink.error("E0205", f"a {side}x{side} patch grid is not divisible by {field} = {factor}",
                       ctx.span_of(field),
                       help=f"pick an image_size whose grid is a multiple of {factor}")
        return None
    return side


@register
class PatchMerger(ConnectorBase):
    """Qwen2-VL's merger: LayerNorm, then each 2x2 block of patches concatenated and sent through an MLP."""

    kind = "patch_merger"
    summary = "Qwen2-VL patch merger: 2x2 patches concatenated, then an MLP"
    merge: int = Field(default=2, ge=1, description="merge an N x N block of patches into one token")  # type: ignore[assignment]
    layers: int = Field(default=2, ge=1, description="MLP layers after the merge")
    hidden: int | None = Field(default=None, gt=0, description="MLP hidden width (default: width x merge^2)")
    norm: bool | Literal["layer", "rms"] = Field(default=True, description="normalisation of each patch before "
                                                 "merging: LayerNorm (`true` or `layer`), RMSNorm with no bias "
                                                 "(`rms`, Qwen2.5-VL) or none (`false`)")
    act: Act = Field(default="gelu", description="MLP activation")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = ctx.inputs[0] if ctx.inputs else TokenShape(0, 0)
        if len(ctx.inputs) > 1:
            ctx.sink.error("E0204", f"patch_merger `{ctx.name}` merges the patches of one encoder, not "
                           f"{len(ctx.inputs)}", ctx.span_of(""), help="give each encoder its own merger")
        if not x.dynamic:
            _square_grid(ctx, x.tokens, self.merge, "merge")
        return TokenShape(x.tokens // (self.merge**2), self.out_width(ctx, x.width * self.merge**2), x.dynamic)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = ctx.inputs[0] if ctx.inputs else TokenShape(0, 0)
        d = x.width * self.merge**2
        out = self.out_width(ctx, d)
        p = {"mlp": _mlp_params(d, self.hidden or d, out, self.layers)}
        if self.norm:
            p["norm"] = x.width if self.norm == "rms" else layernorm(x.width)
        return p


@register
class PixelShuffle(ConnectorBase):
    """Pixel shuffle (InternVL, Idefics3): trade an s x s block of tokens for s^2 times the width, then an MLP.

    The block's tokens enter the channels row by row. InternVL's `pixel_shuffle` (scale 0.5) and
    Idefics3's / SmolVLM's (scale 2-4) both come to this order, through different reshapes, so there is no
    field for it (tests/runtime/test_pixel_shuffle_variants.py checks both). InternVL: `norm = true`,
    `layers = 2`; Idefics3 / SmolVLM: `norm = false  layers = 1  bias = false`."""

    kind = "pixel_shuffle"
    summary = "pixel shuffle (space-to-depth) then an MLP"
    scale: int = Field(default=2, ge=1, description="shuffle an N x N block of tokens into one")
    layers: int = Field(default=2, ge=1, description="MLP layers after the shuffle")
    hidden: int | None = Field(default=None, gt=0, description="MLP hidden width (default: the output width)")
    norm: bool = Field(default=True, description="LayerNorm after the shuffle")
    act: Act = Field(default="gelu", description="MLP activation")
    bias: bool = Field(default=True, description="biases in the MLP's linear layers (Idefics3 / SmolVLM's "
                       "single projection has none)")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = self.merged_input(ctx)
        if not x.dynamic:
            _square_grid(ctx, x.tokens, self.scale, "scale")
        return self.laid_out(x, TokenShape(x.tokens // (self.scale**2), self.out_width(ctx, x.width * self.scale**2),
                                           x.dynamic))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        d = x.width * self.scale**2
        out = self.out_width(ctx, d)
        hidden = self.hidden or out
        mlp = _mlp_params(d, hidden, out, self.layers)
        if not self.bias:  # every linear but the last outputs `hidden`
            mlp -= (self.layers - 1) * hidden + out
        p = {"mlp": mlp}
        if self.norm:
            p["norm"] = layernorm(d)
        return p


@register
class LDP(ConnectorBase):
    """MobileVLM V2's lightweight downsample projector: MLP, 2x2 average pooling, depthwise-conv position encoding."""

    kind = "ldp"
    summary = "MobileVLM LDP: MLP, 2x2 pooling, depthwise-conv position encoding"
    pool: int = Field(default=2, ge=1, description="average-pool an N x N block of tokens")
    act: Act = Field(default="gelu", description="MLP activation")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return self.pooled(ctx, self.pool, "pool")

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        out = self.out_width(ctx, x.width)
        return {"mlp": linear(x.width, out) + linear(out, out), "peg": 9 * out + out}


@register
class CAbstractor(ConnectorBase):
    """Honeybee / MM1 C-Abstractor: residual conv blocks, adaptive pooling to N queries, conv blocks, MLP."""

    kind = "c_abstractor"
    summary = "Honeybee C-Abstractor: conv blocks, adaptive pooling, conv blocks"
    queries: int = Field(default=144, gt=0, description="visual tokens out (a square number)")
    depth: int = Field(default=3, ge=1, description="residual blocks before and after pooling")
    hidden: int = Field(default=1024, gt=0, description="channel width of the conv blocks")
    pos_emb: bool = Field(default=True, description="learned position embedding on the input features")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = self.merged_input(ctx)
        side = math.isqrt(self.queries)
        if side * side != self.queries:
            ctx.sink.error("E0205", f"queries = {self.queries} is not a square number", ctx.span_of("queries"),
                           help=f"use {side * side} or {(side + 1) ** 2}")
        if not x.dynamic:
            _square_grid(ctx, x.tokens, 1, "queries")
        return TokenShape(self.queries, self.out_width(ctx, self.hidden), x.dynamic)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        h = self.hidden
        out = self.out_width(ctx, h)
        block = 2 * 9 * h * h + 2 * layernorm(h)
        p = {"proj_in": linear(x.width, h), "blocks": 2 * self.depth * block, "readout": linear(h, out) + linear(out, out)}
        if self.pos_emb:
            p["pos_emb"] = x.tokens * x.width
        return p


@register
class ConvDownsample(ConnectorBase):
    """A strided convolution over the patch grid (CogVLM2-style 2x2), then an MLP to the output width."""

    kind = "conv"
    summary = "strided conv down-sampler then an MLP"
    stride: int = Field(default=2, ge=1, description="kernel size and stride over the patch grid")
    layers: int = Field(default=2, ge=1, description="MLP layers after the convolution")
    act: Act = Field(default="gelu", description="MLP activation")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return self.pooled(ctx, self.stride, "stride")

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = self.merged_input(ctx)
        out = self.out_width(ctx, x.width)
        return {"conv": x.width * x.width * self.stride**2 + x.width, "mlp": _mlp_params(x.width, out, out, self.layers)}

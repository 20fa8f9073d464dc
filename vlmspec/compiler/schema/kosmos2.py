"""`kosmos2` (Kosmos-2's text decoder) and `latent_queries` (its image-to-text projection).

Kosmos-2's decoder is a MAGNETO-style ("sub-LN") transformer rather than a Llama: LayerNorm with biases, no
rotary but a fixed sinusoidal table read at `position + pad_id + 1` (fairseq's padding offset), the token
embeddings (image features included) multiplied by sqrt(width), biased q/k/v/out projections with a LayerNorm
on the attention output before `out_proj` (`inner_attn_ln`), and a GELU FFN with a LayerNorm on its hidden
activations (`ffn_layernorm`). As a delta on `LanguageBase` it overrides its parameter formulas and refuses
what it has no place for (grouped-query attention, another head width, rotary settings, routed experts).

`latent_queries` is its projector: the (L2-normalised) vision tokens through one dense layer, then a fixed
set of learned queries attends once over [projected features; queries]. Flamingo's `perceiver` cannot say
this exactly: it has LayerNorms, residuals and a feed-forward in each block, no bias and no dense layer first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmspec.compiler.schema.base import ShapeContext, TokenShape, layernorm, linear, register
from vlmspec.compiler.schema.connectors import ConnectorBase
from vlmspec.compiler.schema.language import LanguageBase


@register
class Kosmos2(LanguageBase):
    """Kosmos-2's decoder: sinusoidal positions, scaled embeddings, sub-LN attention and FFN, tied head."""

    kind = "kosmos2"
    summary = "Kosmos-2 decoder: sinusoidal positions, sqrt(width)-scaled embeddings, sub-LN attention and FFN"
    width: int = Field(default=2048, gt=0, description="hidden size")
    depth: int = Field(default=24, gt=0, le=256, description="decoder layers")
    heads: int = Field(default=32, gt=0, le=1024, description="attention heads (key/value heads too)")
    ffn: int = Field(default=8192, gt=0, description="feed-forward hidden size")
    vocab: int = Field(default=65037, gt=0, description="vocabulary size")
    max_positions: int = Field(default=2048, gt=0, description="longest sequence (prompt + image tokens + answer)")
    norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    tie_embeddings: bool = Field(default=True, description="share the input embedding with the output head")
    act: Literal["gelu", "relu", "gelu_tanh", "silu"] = Field(default="gelu", description="FFN activation")
    pad_id: int = Field(default=1, ge=0, description="the padding token id: the sinusoidal table is read at "
                        "position + pad_id + 1 (fairseq's offset; HF `pad_token_id`)")
    scale_embed: bool = Field(default=True, description="multiply the embeddings (image features included) by "
                              "sqrt(width) (HF `scale_embedding`)")

    def check(self, ctx: ShapeContext) -> None:
        super().check(ctx)
        if self.kv_heads is not None and self.kv_heads != self.heads:
            ctx.sink.error("E0290", f"a `kosmos2` model has as many key/value heads as heads ({self.heads}), not "
                           f"{self.kv_heads}", ctx.span_of("kv_heads"), help="drop `kv_heads`")
        if self.head_dim is not None and self.head_dim * self.heads != self.width:
            ctx.sink.error("E0290", f"a `kosmos2` model's heads tile its width: head_dim {self.head_dim} x heads "
                           f"{self.heads} is not width {self.width}", ctx.span_of("head_dim"),
                           help="drop `head_dim` (it is width / heads)")
        for name in ("rope", "rope_theta"):
            if name in self.model_fields_set:
                ctx.sink.error("E0291", f"a `kosmos2` model has sinusoidal positions, no rotary: `{name}` has no "
                               "effect", ctx.span_of(name), help=f"drop `{name}`")
        for name in ("moe", "extra_vocab", "embed_extra"):
            if name in self.model_fields_set and getattr(self, name):
                ctx.sink.error("E0293", f"a `kosmos2` model has no `{name}` support", ctx.span_of(name),
                               help=f"drop `{name}`, or use a `llama` language model")

    # --- parameter formulas (Kosmos2TextForCausalLM's, checked on the meta device)
    def attn_params(self) -> int:
        w = self.width
        return 4 * linear(w, w) + layernorm(w)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn
        return linear(self.width, f) + layernorm(f) + linear(f, self.width)

    def norm_params(self) -> int:
        return layernorm(self.width)

    def lora_targets(self) -> list[str]:
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]


@register
class LatentQueries(ConnectorBase):
    """Kosmos-2's image-to-text projection: dense, then learned queries attend over [features; queries]."""

    kind = "latent_queries"
    summary = "Kosmos-2 projection: dense layer, then N learned queries attend once over [features; queries]"
    latents: int = Field(default=64, gt=0, description="learned queries (= visual tokens out; HF `latent_query_num`)")
    heads: int = Field(default=32, gt=0, description="attention heads of the one cross-attention")
    normalize: bool = Field(default=True, description="L2-normalise each input token first (Kosmos-2 does, after "
                            "the tower's post-LayerNorm)")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return TokenShape(self.latents, self.out_width(ctx, self.merged_input(ctx).width))

    def check(self, ctx: ShapeContext) -> None:
        w = self.out_width(ctx, self.merged_input(ctx).width)
        if w % self.heads:
            ctx.sink.error("E0292", f"the output width {w} is not divisible by heads = {self.heads}",
                           ctx.span_of("heads"), help="use heads that divide the language model's width")

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        d = self.merged_input(ctx).width
        w = self.out_width(ctx, d)
        return {"dense": linear(d, w), "latents": self.latents * w, "attn": 4 * linear(w, w)}

    def subpaths(self) -> list[str]:
        return ["dense", "latents", "attn"]

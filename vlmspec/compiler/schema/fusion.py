"""Fusion styles: how visual tokens reach the language model.

- `prefix`: visual tokens replace `<image>` placeholders in the text embeddings (LLaVA, BLIP-2).
- `cross_attention`: tanh-gated cross-attention blocks every N layers (Flamingo, IDEFICS, Llama 3.2).
- `visual_expert`: image positions get their own QKV and MLP weights in each layer (CogVLM).
- `moe`: prefix splicing plus routed expert FFNs in the decoder (MoE-LLaVA).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from vlmspec.compiler.schema.base import ComponentSchema, ShapeContext, TokenShape, linear, register
from vlmspec.compiler.schema.language import LanguageBase, MoE


class FusionBase(ComponentSchema):
    role = "fusion"
    #: True when visual tokens sit in the text sequence (and so count towards its length).
    in_sequence: ClassVar[bool] = True

    def check_against(self, ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
        """Fusion rules that need the language model; `visual` is the merged visual input."""

    def params_for(self, llm: LanguageBase, visual: TokenShape) -> dict[str, int]:
        return {}

    def layer_ids(self, depth: int) -> list[int]:
        return []


def _check_prefix_width(ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
    if visual.width != llm.width:
        ctx.sink.error("E0203", f"fusion `{ctx.name}` feeds tokens of width {visual.width} into a language model "
                       f"of width {llm.width}", ctx.span_of(""),
                       help="end the connector at the language model's width (leave its `out` unset)")


@register
class Prefix(FusionBase):
    """Visual tokens replace the image placeholder tokens of the prompt (LLaVA, BLIP-2, PaliGemma)."""

    kind = "prefix"
    summary = "visual tokens spliced in place of <image> placeholders"
    image_token: str = Field(default="<image>", min_length=1, description="placeholder token in prompts")
    tokens: int | None = Field(default=None, gt=0, description="expected visual tokens per image (checked, e.g. LLaVA's 576)")
    prefix_attention: Literal["causal", "bidirectional"] = Field(
        default="causal", description="attention within the prompt (images + text): `bidirectional` is PaliGemma's "
        "prefix-LM; the answer is causal either way")

    def check_against(self, ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
        _check_prefix_width(ctx, visual, llm)
        if self.tokens is not None and not visual.dynamic and self.tokens != visual.tokens:
            ctx.sink.error("E0204", f"fusion `{ctx.name}` declares {self.tokens} image tokens but the connector "
                           f"produces {visual.tokens}", ctx.span_of("tokens"),
                           help=f"set `tokens = {visual.tokens}` or change the encoder / connector")


@register
class CrossAttention(FusionBase):
    """Tanh-gated cross-attention blocks inserted before chosen decoder layers; text attends to images."""

    kind = "cross_attention"
    summary = "tanh-gated cross-attention blocks every N decoder layers"
    in_sequence = False
    every: int | None = Field(default=4, ge=1, description="a block before every N-th decoder layer (0, N, 2N, ...)")
    offset: int = Field(default=0, ge=0, description="index of the first decoder layer with a block")
    layers: list[int] | None = Field(default=None, description="explicit decoder layer indices (overrides every)")
    gate: Literal["tanh", "none"] = Field(default="tanh", description="gating of the residual branches; tanh gates start at 0")
    mlp: bool = Field(default=True, description="a gated feed-forward after each cross-attention")
    qk_norm: bool = Field(default=False, description="RMSNorm on queries and keys per head (Llama 3.2 Vision)")
    image_token: str = Field(default="<image>", min_length=1, description="marks where images sit in the prompt")
    image_attention: Literal["all", "latest", "latest_group"] = Field(
        default="all", description="which images a text token attends to: `all` of its sample's, only the "
        "`latest` one whose image token is at or before it (Flamingo, IDEFICS), or the `latest_group` of "
        "adjacent image tokens (Llama 3.2 Vision: `<|image|><|image|>` shows both to the text after them)")
    no_image: Literal["skip_attention", "skip_block", "attend_all"] = Field(
        default="skip_attention", description="a text token that sees no image (before the first image token): "
        "its cross-attention adds nothing (`skip_attention`, IDEFICS), neither branch adds anything "
        "(`skip_block`, Meta's Llama 3.2 reference), or its cross-attention reads every visual token and its "
        "feed-forward adds nothing (`attend_all`, transformers' Mllama)")
    vector_gates: bool = Field(default=False, description="one tanh gate per channel instead of one per branch "
                               "(IDEFICS' `alpha_type = vector`)")
    weights: str | None = Field(default=None, description="local checkpoint folder (`DIR#part`) to load these "
                                "blocks from")

    def layer_ids(self, depth: int) -> list[int]:
        if self.layers is not None:
            return sorted(set(self.layers))
        step = self.every or 1
        return [i for i in range(depth) if i >= self.offset and (i - self.offset) % step == 0]

    def check_against(self, ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < llm.depth]
            if bad:
                ctx.sink.error("E0301", f"cross-attention layer indices {bad} are outside the language model's "
                               f"{llm.depth} layers", ctx.span_of("layers"), help=f"use indices 0..{llm.depth - 1}")
        elif (self.every or 1) > llm.depth or self.offset >= llm.depth:
            ctx.sink.error("E0301", f"cross-attention every {self.every} (offset {self.offset}) inserts no block "
                           f"in a language model of depth {llm.depth}", ctx.span_of("every"),
                           help=f"use every <= {llm.depth}")

    def params_for(self, llm: LanguageBase, visual: TokenShape) -> dict[str, int]:
        w, inner = llm.width, llm.heads * llm.hd
        kv_inner = llm.n_kv * llm.hd
        block = linear(w, inner, False) + 2 * linear(visual.width, kv_inner, False) + linear(inner, w, False)
        block += llm.norm_params()
        if self.qk_norm:
            block += 2 * llm.hd
        if self.mlp:
            block += llm.mlp_params() + llm.norm_params()
        if self.gate == "tanh":  # one gate per branch: the cross-attention, and the feed-forward
            block += (2 if self.mlp else 1) * (w if self.vector_gates else 1)
        return {"blocks": len(self.layer_ids(llm.depth)) * block}


@register
class VisualExpert(FusionBase):
    """CogVLM's visual expert: image positions use their own QKV, output and MLP weights in each layer."""

    kind = "visual_expert"
    summary = "CogVLM visual expert: separate QKV and MLP weights for image tokens"
    layers: Literal["all"] | list[int] = Field(default="all", description="`all`, or the decoder layer indices that get an expert")
    image_token: str = Field(default="<image>", min_length=1, description="placeholder token in prompts")

    def layer_ids(self, depth: int) -> list[int]:
        return list(range(depth)) if self.layers == "all" else sorted(set(self.layers))

    def check_against(self, ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
        _check_prefix_width(ctx, visual, llm)
        if self.layers != "all":
            bad = [i for i in self.layers if not 0 <= i < llm.depth]
            if bad:
                ctx.sink.error("E0301", f"visual-expert layer indices {bad} are outside the language model's "
                               f"{llm.depth} layers", ctx.span_of("layers"), help=f"use indices 0..{llm.depth - 1}")

    def params_for(self, llm: LanguageBase, visual: TokenShape) -> dict[str, int]:
        per_layer = llm.attn_params() + llm.mlp_params()
        return {"experts": len(self.layer_ids(llm.depth)) * per_layer}


@register
class MoEFusion(FusionBase):
    """MoE-LLaVA: visual tokens as a prefix, and routed expert FFNs (up-cycled from the dense FFN) in the decoder."""

    kind = "moe"
    summary = "prefix splicing plus routed expert FFNs (MoE-LLaVA)"
    image_token: str = Field(default="<image>", min_length=1, description="placeholder token in prompts")
    experts: int = Field(default=4, ge=1, description="expert FFNs per MoE layer")
    top_k: int = Field(default=2, ge=1, description="experts each token is routed to")
    every: int = Field(default=2, ge=1, description="an MoE layer every N decoder layers (layers 0, N, 2N, ...)")
    offset: int = Field(default=0, ge=0, description="first MoE layer index")
    shared: int = Field(default=0, ge=0, description="shared experts every token also goes through")
    aux_loss: float = Field(default=0.01, ge=0, description="weight of the load-balancing loss")

    def as_moe(self) -> MoE:
        return MoE(experts=self.experts, top_k=self.top_k, every=self.every, offset=self.offset,
                   shared=self.shared, aux_loss=self.aux_loss)

    def layer_ids(self, depth: int) -> list[int]:
        return self.as_moe().layer_ids(depth)

    def check_against(self, ctx: ShapeContext, visual: TokenShape, llm: LanguageBase) -> None:
        _check_prefix_width(ctx, visual, llm)
        if self.top_k > self.experts:
            ctx.sink.error("E0302", f"moe routes each token to top_k = {self.top_k} of only {self.experts} experts",
                           ctx.span_of("top_k"), help=f"top_k must be at most {self.experts}")
        if llm.moe is not None:
            ctx.sink.error("E0303", f"fusion `{ctx.name}` adds experts to a language model that already has a `moe` block",
                           ctx.span_of(""), help="keep one of the two")
        if self.offset >= llm.depth:
            ctx.sink.error("E0301", f"moe offset {self.offset} is beyond the language model's {llm.depth} layers",
                           ctx.span_of("offset"))

    def params_for(self, llm: LanguageBase, visual: TokenShape) -> dict[str, int]:
        moe = self.as_moe()
        return {"experts": len(moe.layer_ids(llm.depth)) * llm.moe_extra(moe)}

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if not sub and llm is not None:  # the experts, and the dense FFNs they start from (expert 0)
            return parts.get("experts", 0) + len(self.layer_ids(llm.depth)) * llm.mlp_params()
        return super().part_params(sub, parts, llm)

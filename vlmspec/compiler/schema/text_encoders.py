"""The text role: the caption towers of contrastive models (CLIP's and SigLIP's text transformers).

A `text` component reads token ids and gives one pooled vector per caption; a `contrastive` fusion
compares it with an image tower's pooled vector. The two kinds differ in what the pooled vector is, and
that is a property of the trained weights, so it is part of the kind, not a free setting:

    text txt = clip_text { width = 512  depth = 12  heads = 8  vocab = 49408  max_positions = 77 }
    text txt = siglip_text { width = 768  depth = 12  heads = 12  vocab = 32000  max_positions = 64 }

- `clip_text`: causal attention; the pooled vector is the end-of-text token's final state. Which token
  that is follows the checkpoint's config: `pool = eos` takes the first position holding `eos_token_id`;
  `pool = argmax` takes the position of the largest id (original CLIP checkpoints, whose config says
  eos_token_id = 2 while their end-of-text token is the vocabulary's last id).
- `siglip_text`: bidirectional attention; the pooled vector is the last position's state through a
  `head` linear layer (SigLIP pads every caption to `max_positions`, so the last position is fixed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmspec.compiler.schema.base import (
    MAX_HEADS,
    MAX_LAYERS,
    ComponentSchema,
    Dtype,
    ShapeContext,
    TokenShape,
    layernorm,
    linear,
    register,
)

TextAct = Literal["quick_gelu", "gelu", "gelu_tanh"]


class TextTowerBase(ComponentSchema):
    """Fields both text towers share: token and learned position embeddings, pre-LN blocks, final LayerNorm."""

    role = "text"
    checkpointable = True  # its blocks run through `run_block` (runtime/text/towers.py)
    width: int = Field(default=512, gt=0, description="hidden size")
    depth: int = Field(default=12, gt=0, le=MAX_LAYERS, description="number of transformer layers")
    heads: int = Field(default=8, gt=0, le=MAX_HEADS, description="attention heads")
    mlp: int | None = Field(default=None, gt=0, description="MLP hidden size (default: 4 x width)")
    vocab: int = Field(default=49408, gt=0, description="token embedding rows")
    max_positions: int = Field(default=77, gt=0, description="learned positions: the longest caption, in tokens")
    act: TextAct = Field(default="quick_gelu", description="MLP activation")
    norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this tower from")
    tokenizer: str | None = Field(default=None, description="folder to read the captions' tokenizer from "
                                  "(default: the `weights` folder's, when it holds one)")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")

    @property
    def mlp_dim(self) -> int:
        return self.mlp if self.mlp is not None else 4 * self.width

    @property
    def pooled_width(self) -> int:
        return self.width

    def check(self, ctx: ShapeContext) -> None:
        if self.width % self.heads:
            near = [h for h in range(1, self.heads + 1) if self.width % h == 0]
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"),
                           help=f"use heads = {max(near)}")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        return TokenShape(1, self.pooled_width)

    def block_tokens(self) -> int:
        """Tokens the blocks run over per caption (it leaves as one vector): captions are padded to
        `max_positions` (the activation estimate counts these, not the one pooled output)."""
        return self.max_positions

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w, m = self.width, self.mlp_dim
        block = 4 * linear(w, w) + 2 * layernorm(w) + linear(w, m) + linear(m, w)
        return {"embeddings": (self.vocab + self.max_positions) * w, "layers": self.depth * block,
                "norm": layernorm(w)}

    def subpaths(self) -> list[str]:
        return []  # stages freeze or train the tower whole

    def lora_targets(self) -> list[str]:
        return []


@register
class ClipText(TextTowerBase):
    """CLIP's text transformer: causal pre-LN blocks; pooled = the end-of-text token's final state."""

    kind = "clip_text"
    summary = "CLIP text transformer (causal; pooled at the end-of-text token)"
    pool: Literal["eos", "argmax"] = Field(default="eos", description="which token is pooled: `eos`, the first "
                                           "holding eos_token_id; `argmax`, the largest id (original CLIP "
                                           "checkpoints, whose config says eos_token_id = 2)")
    eos_token_id: int = Field(default=49407, ge=0, description="the end-of-text id `pool = eos` looks for")

    def check(self, ctx: ShapeContext) -> None:
        super().check(ctx)
        # (the default value is what `show --resolved` prints, so it stays accepted)
        default = type(self).model_fields["eos_token_id"].default
        if self.pool == "argmax" and self.eos_token_id != default:
            ctx.sink.error("E0225", "eos_token_id is not read with pool = argmax, which pools the largest id",
                           ctx.span_of("eos_token_id"),
                           help="drop `eos_token_id`, or pool at it with `pool = eos`")
        if self.pool == "eos" and self.eos_token_id >= self.vocab:
            ctx.sink.error("E0222", f"eos_token_id {self.eos_token_id} is not a row of the {self.vocab}-token "
                           "vocabulary, so no caption can hold it", ctx.span_of("eos_token_id"),
                           help=f"use the tokenizer's end-of-text id (below {self.vocab})")


@register
class SiglipText(TextTowerBase):
    """SigLIP's text transformer: bidirectional pre-LN blocks; pooled = the last position through `head`."""

    kind = "siglip_text"
    summary = "SigLIP text transformer (bidirectional; last position through a linear head)"
    vocab: int = Field(default=32000, gt=0, description="token embedding rows")
    max_positions: int = Field(default=64, gt=0, description="learned positions; SigLIP pads every caption to "
                               "this length, and pools the last one")
    act: TextAct = Field(default="gelu_tanh", description="MLP activation")
    norm_eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon")
    projection: int | None = Field(default=None, gt=0, description="output width of the pooled `head` linear "
                                   "(SigLIP's projection_size; default: width)")

    @property
    def pooled_width(self) -> int:
        return self.projection if self.projection is not None else self.width

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        return {**super().params(ctx), "head": linear(self.width, self.pooled_width)}

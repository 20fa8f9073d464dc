"""`t5`: an encoder-decoder language model (T5 v1.1, Flan-T5, mT5, as Hugging Face's `T5ForConditionalGeneration`).

An encoder stack reads the prompt (with the image tokens a `prefix` fusion puts in it) bidirectionally, a
decoder stack generates the answer, reading the encoder's output through cross-attention in every layer.
Positions are relative: each stack's first self-attention owns a table of `buckets` learned biases per head
(log-spaced up to `max_distance`) that every layer of the stack adds to its attention scores; queries are
not scaled by 1 / sqrt(head_dim). Norms are RMSNorm without bias; the FFN is gated (Flan-T5's GeGLU, `wi_0`
/ `wi_1` / `wo`) or plain (T5 v1.0's ReLU, `wi` / `wo`). A tied head (T5 v1.0) scales the decoder's output
by width ** -0.5 before it; an untied one (T5 v1.1, Flan-T5) does not, as transformers reads the two.

It answers the questions the compiler and the runtime ask of a language model (width, vocab, max_positions,
parts, LoRA targets) with its own numbers. It hosts only the fusion that puts image tokens into the
encoder's input (`prefix`, BLIP-2's layout): a cross-attention or visual-expert fusion would reach into
decoder layers whose structure is not a decoder-only LM's (E0255).

It is not a `LanguageBase`: kv_heads, rope, rope_theta, moe are no fields of it, so writing one is the
usual unknown-attribute error rather than an attribute that silently does nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from vlmspec.compiler.schema.base import (
    MAX_HEADS,
    MAX_LAYERS,
    ShapeContext,
    register,
)
from vlmspec.compiler.schema.prefix_language import PrefixOnlyLanguage


@register
class T5(PrefixOnlyLanguage):
    """T5 / Flan-T5 / mT5 encoder-decoder: relative position buckets, RMSNorm, gated-GELU or ReLU FFNs."""

    kind = "t5"
    summary = "T5 / Flan-T5 encoder-decoder (relative positions, image tokens into the encoder)"
    unpackable = "a row is two sequences, the prompt its encoder reads and the answer its decoder writes"
    fusion_codes = ("E0255", "E0256")
    cannot_host = {"cross_attention": "inserts gated cross-attention blocks among a decoder-only model's layers",
                   "visual_expert": "gives image tokens their own attention and MLP weights in a decoder-only "
                   "model's layers",
                   "moe": "turns a decoder-only model's FFNs into routed experts"}
    default_need = "reaches inside a decoder-only model's layers"
    lacks = "and only the image tokens in the encoder's input are supported"
    host_help = "use `fusion prefix(...)`: the image tokens go in front of the prompt into the encoder (BLIP-2 Flan-T5)"
    no_bidirectional = "'s prompt goes to its encoder, which reads it both ways already"
    bidirectional_help = "drop `prefix_attention` (the encoder attends bidirectionally, the decoder causally)"
    #: the VLM around it runs an encoder, then a decoder (runtime/encoder_decoder.py)
    encoder_decoder: ClassVar[bool] = True

    @property
    def kind_phrase(self) -> str:
        return "`t5` (encoder-decoder)"

    width: int = Field(default=2048, gt=0, description="hidden size (d_model)")
    depth: int = Field(default=24, gt=0, le=MAX_LAYERS, description="encoder layers (num_layers)")
    decoder_depth: int | None = Field(default=None, gt=0, le=MAX_LAYERS,
                                      description="decoder layers (num_decoder_layers; default: depth)")
    heads: int = Field(default=32, gt=0, le=MAX_HEADS, description="attention heads")
    head_dim: int = Field(default=64, gt=0, description="width of one head (d_kv; heads x head_dim need not be width)")
    ffn: int = Field(default=5120, gt=0, description="feed-forward hidden size (d_ff)")
    gated: bool = Field(default=True, description="gated FFN (`wi_0`, `wi_1`, `wo`: Flan-T5's gated-gelu); false: "
                        "`wi`, `wo` (T5 v1.0's relu)")
    act: Literal["gelu_tanh", "relu", "gelu", "silu"] = Field(
        default="gelu_tanh", description="FFN activation (`gelu_tanh` is transformers' `gelu_new`)")
    buckets: int = Field(default=32, ge=4, description="relative attention buckets (relative_attention_num_buckets)")
    max_distance: int = Field(default=128, gt=0, description="distance past which relative positions share "
                              "the last bucket (relative_attention_max_distance)")
    vocab: int = Field(default=32128, gt=0, description="vocabulary size")
    max_positions: int = Field(default=512, gt=0, description="longest encoder input (prompt + image tokens) and "
                               "longest answer; relative positions set no limit of their own")
    norm_eps: float = Field(default=1e-6, gt=0, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(default=False, description="share the input embedding with the output head, the "
                                 "decoder's output scaled by width ** -0.5 before it (T5 v1.0); Flan-T5's head is "
                                 "its own")
    decoder_start: int = Field(default=0, ge=0, description="the token the decoder starts from "
                               "(decoder_start_token_id: T5's pad)")

    @property
    def n_kv(self) -> int:
        return self.heads

    @property
    def hd(self) -> int:
        return self.head_dim

    # --- derived sizes
    @property
    def n_dec(self) -> int:
        return self.decoder_depth if self.decoder_depth is not None else self.depth

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    def check(self, ctx: ShapeContext) -> None:
        exact = self.buckets // 2  # the causal decoder gives half its buckets to exact distances (the encoder a quarter)
        if self.max_distance <= exact:
            ctx.sink.error("E0257", f"max_distance = {self.max_distance} leaves no room for T5's log-spaced "
                           f"buckets: the decoder's first {exact} distances already have a bucket each",
                           ctx.span_of("max_distance"), help=f"use max_distance > {exact} (T5: 128 with 32 buckets)")
        if self.decoder_start >= self.vocab:
            ctx.sink.error("E0258", f"decoder_start = {self.decoder_start} is outside the vocabulary of {self.vocab}",
                           ctx.span_of("decoder_start"), help="T5 starts its decoder from the pad token, id 0")

    # --- parameter formulas (T5ForConditionalGeneration's, checked on the meta device)
    def attn_params(self) -> int:
        return 4 * self.width * self.inner  # q, k, v, o without biases

    def mlp_params(self) -> int:
        return (3 if self.gated else 2) * self.width * self.ffn

    def bias_params(self) -> int:
        """One stack's relative-position table (its first self-attention's)."""
        return self.buckets * self.heads

    def encoder_params(self) -> int:
        return self.depth * (self.attn_params() + self.mlp_params() + 2 * self.width) + self.bias_params() \
            + self.width

    def decoder_params(self) -> int:
        return self.n_dec * (2 * self.attn_params() + self.mlp_params() + 3 * self.width) + self.bias_params() \
            + self.width

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        p = {"embed": self.vocab * self.width, "encoder": self.encoder_params(), "decoder": self.decoder_params()}
        if not self.tie_embeddings:
            p["head"] = self.vocab * self.width
        return p

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "attn":  # self- and cross-attention of both stacks, with the relative-position tables
            return (self.depth + 2 * self.n_dec) * self.attn_params() + 2 * self.bias_params()
        if sub == "mlp":
            return (self.depth + self.n_dec) * self.mlp_params()
        if sub == "norm":  # the two stacks' final norms
            return 2 * self.width
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        return ["embed", "encoder", "decoder", "attn", "mlp", "norm", "head"]

    def _ffn_targets(self) -> list[str]:
        return ["wi_0", "wi_1", "wo"] if self.gated else ["wi", "wo"]

    def lora_targets(self) -> list[str]:
        attn = ["q", "k", "v", "o"]
        return ([f"encoder.attn.{t}" for t in attn] + [f"encoder.mlp.{t}" for t in self._ffn_targets()]
                + [f"decoder.attn.{t}" for t in attn] + [f"decoder.cross.{t}" for t in attn]
                + [f"decoder.mlp.{t}" for t in self._ffn_targets()])

    def default_lora_targets(self) -> list[str]:
        """`lora llm(rank = r)` without targets: q and v of every attention, as LoRA's paper adapts them."""
        return [t for t in self.lora_targets() if ".attn." in t or ".cross." in t if t[-1] in "qv"]

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA target, for counting adapter parameters."""
        w, q, f = self.width, self.inner, self.ffn
        one = {"attn.q": (w, q), "attn.k": (w, q), "attn.v": (w, q), "attn.o": (q, w), "cross.q": (w, q),
               "cross.k": (w, q), "cross.v": (w, q), "cross.o": (q, w), "mlp.wi_0": (w, f), "mlp.wi_1": (w, f),
               "mlp.wi": (w, f), "mlp.wo": (f, w)}
        return {t: one[t.split(".", 1)[1]] for t in self.lora_targets()}

    def lora_layers(self, target: str) -> int:
        """How many layers hold LoRA target `target` (the two stacks may differ in depth)."""
        return self.depth if target.startswith("encoder.") else self.n_dec

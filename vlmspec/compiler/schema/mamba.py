"""`mamba`: a state-space language model (Mamba-1, as Hugging Face's `MambaForCausalLM`).

A Mamba layer has no attention and no FFN: RMSNorm, then a mixer (in_proj -> x and a gate z, a causal
depthwise conv1d over x, x_proj -> (dt, B, C), dt_proj, a selective scan with A = -exp(A_log) and a skip
D, gated by silu(z), out_proj), added to the residual. So it answers the questions the compiler and the
runtime ask of a language model (width, vocab, max_positions, parts, LoRA targets) with its own numbers,
and it hosts only fusions that put the image tokens in the sequence (`prefix`): the styles that reach
into attention or FFN weights (cross_attention, visual_expert, moe) have nothing to reach (E0245).

It is not a `LanguageBase`: heads, kv_heads, rope, ffn are no fields of it, so writing one is the usual
unknown-attribute error rather than an attribute that silently does nothing.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from vlmspec.compiler.schema.base import (
    MAX_LAYERS,
    ShapeContext,
    linear,
    register,
)
from vlmspec.compiler.schema.prefix_language import PrefixOnlyLanguage


@register
class Mamba(PrefixOnlyLanguage):
    """Mamba-1 (state-spaces/mamba-*, Cobra's language model): RMSNorm + selective-scan mixer per layer."""

    kind = "mamba"
    summary = "Mamba state-space decoder (selective scan, no attention)"
    unpackable = "its scan carries state from one sample into the next"
    fusion_codes = ("E0245", "E0246")
    cannot_host = {"cross_attention": "inserts cross-attention blocks among attention layers",
                   "visual_expert": "gives image tokens their own attention and MLP weights in every layer",
                   "moe": "turns each layer's dense FFN into routed experts"}
    default_need = "reaches inside the language model's layers"
    lacks = "and a Mamba layer has none (only a selective-scan mixer)"
    host_help = "use `fusion prefix(...)`: the image tokens go into the Mamba's input sequence (Cobra, VL-Mamba)"
    no_bidirectional = " reads its sequence left to right (a scan, not attention)"
    bidirectional_help = "drop `prefix_attention` (a Mamba's prompt is causal)"

    width: int = Field(default=2560, gt=0, description="hidden size (d_model)")
    depth: int = Field(default=64, gt=0, le=MAX_LAYERS, description="Mamba layers")
    state: int = Field(default=16, gt=0, description="SSM state size per channel (d_state)")
    conv: int = Field(default=4, gt=0, description="causal depthwise convolution kernel (d_conv)")
    expand: int = Field(default=2, gt=0, description="inner width = expand x width")
    dt_rank: int | None = Field(default=None, gt=0, description="rank of the time-step projection "
                                "(default: ceil(width / 16))")
    vocab: int = Field(default=50280, gt=0, description="vocabulary size")
    max_positions: int = Field(default=2048, gt=0, description="longest sequence accepted (prompt + image tokens + "
                               "answer); a scan has no position limit of its own")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(default=True, description="share the input embedding with the output head")
    conv_bias: bool = Field(default=True, description="a bias on the conv1d (HF `use_conv_bias`)")
    bias: bool = Field(default=False, description="biases on in_proj and out_proj (HF `use_bias`)")
    residual_fp32: bool = Field(default=True, description="keep the residual stream in float32 under bf16 / fp16 "
                                "(HF `residual_in_fp32`)")

    @property
    def ffn(self) -> int:
        """Not a field: the width at which the activation estimate (compiler/activations.py) counts what a
        layer saves for the backward pass (4 tensors of this width at 2 bytes). The plain-PyTorch scan keeps
        the discretised A, B x and the state, inner x state float32 values each, per token, besides about 6
        tensors of the inner width: 4 x 2 x ffn = 6 x 2 x inner + 3 x 4 x inner x state."""
        return self.inner * (3 + 3 * self.state) // 2

    # --- derived sizes
    @property
    def inner(self) -> int:
        return self.expand * self.width

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.width / 16)

    # --- parameter formulas (MambaForCausalLM's, checked on the meta device)
    def mixer_params(self) -> int:
        d, r, n = self.inner, self.rank, self.state
        return (linear(self.width, 2 * d, self.bias) + d * self.conv + (d if self.conv_bias else 0)
                + linear(d, r + 2 * n, False) + linear(r, d) + d * n + d + linear(d, self.width, self.bias))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        p = {"embed": self.vocab * self.width, "layers": self.depth * (self.mixer_params() + self.width),
             "norm": self.width}
        if not self.tie_embeddings:
            p["head"] = self.vocab * self.width
        return p

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "mixer":
            return self.depth * self.mixer_params()
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        return ["embed", "layers", "mixer", "norm", "head"]

    def lora_targets(self) -> list[str]:
        return ["mixer.in_proj", "mixer.x_proj", "mixer.out_proj"]

    def default_lora_targets(self) -> list[str]:
        """`lora llm(rank = r)` without targets: the mixer's input and output projections."""
        return ["mixer.in_proj", "mixer.out_proj"]

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA target, for counting adapter parameters."""
        d = self.inner
        return {"mixer.in_proj": (self.width, 2 * d), "mixer.x_proj": (d, self.rank + 2 * self.state),
                "mixer.out_proj": (d, self.width)}

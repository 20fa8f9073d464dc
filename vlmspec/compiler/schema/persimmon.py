"""`persimmon`: Adept's Persimmon decoder, the language model of Fuyu (HF `PersimmonForCausalLM`).

Persimmon is Llama's shape with other parts: LayerNorm with bias everywhere, one fused q/k/v projection
(each head's q, k and v side by side), a LayerNorm over each head's queries and keys (`qk_norm`), rotary on
only the first `partial_rotary` of each head, a squared-ReLU MLP with biases and an untied head. As a delta
on `LanguageBase` it overrides only what differs: its parameter formulas and the checks a fused
projection adds (no grouped-query attention, heads that tile the width).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmspec.compiler.schema.base import ShapeContext, layernorm, linear, register
from vlmspec.compiler.schema.language import LanguageBase


@register
class Persimmon(LanguageBase):
    """Persimmon-8B / Fuyu's decoder: LayerNorm, fused QKV with q/k LayerNorm, partial rotary, relu^2 MLP."""

    kind = "persimmon"
    summary = "Persimmon decoder (Fuyu): fused QKV, q/k LayerNorm, partial rotary, squared-ReLU MLP"
    width: int = Field(default=4096, gt=0, description="hidden size")
    depth: int = Field(default=36, gt=0, le=256, description="decoder layers")
    heads: int = Field(default=64, gt=0, le=1024, description="attention heads (key/value heads too: the fused "
                       "projection has no grouped-query attention)")
    ffn: int = Field(default=16384, gt=0, description="feed-forward hidden size")
    vocab: int = Field(default=262144, gt=0, description="vocabulary size")
    max_positions: int = Field(default=16384, gt=0, description="longest sequence (prompt + image tokens + answer)")
    rope_theta: float = Field(default=25000.0, gt=0, description="rotary base frequency")
    norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    partial_rotary: float = Field(default=0.5, gt=0, le=1, description="fraction of each head that is rotated "
                                  "(HF `partial_rotary_factor`)")
    qk_norm: bool = Field(default=True, description="a LayerNorm (with bias) over each head's queries and keys "
                          "before the rotary (HF `qk_layernorm`)")
    act: Literal["relu2", "relu", "gelu"] = Field(default="relu2", description="MLP activation (relu2: squared ReLU)")

    @property
    def rotary_dim(self) -> int:
        return int(self.partial_rotary * self.hd)

    def check(self, ctx: ShapeContext) -> None:
        super().check(ctx)
        if self.kv_heads is not None and self.kv_heads != self.heads:
            ctx.sink.error("E0252", f"a `persimmon` model projects q, k and v together, head by head, so it has as "
                           f"many key/value heads as heads ({self.heads}), not {self.kv_heads}",
                           ctx.span_of("kv_heads"), help="drop `kv_heads`")
        if self.head_dim is not None and self.head_dim * self.heads != self.width:
            ctx.sink.error("E0252", f"a `persimmon` model's heads tile its width: head_dim {self.head_dim} x heads "
                           f"{self.heads} is not width {self.width}", ctx.span_of("head_dim"),
                           help="drop `head_dim` (it is width / heads)")
        if self.rotary_dim == 0 or self.rotary_dim % 2:
            ctx.sink.error("E0253", f"partial_rotary {self.partial_rotary} of head_dim {self.hd} rotates "
                           f"{self.rotary_dim} values per head; rotary needs a positive even count",
                           ctx.span_of("partial_rotary"),
                           help="use a fraction of head_dim that is a positive even number of values (Fuyu: 0.5)")
        if self.moe is not None:
            ctx.sink.error("E0254", "a `persimmon` model has no routed-expert (`moe`) support", ctx.span_of("moe"),
                           help="drop `moe`, or use a `llama` language model")

    # --- parameter formulas (PersimmonForCausalLM's, checked on the meta device)
    def attn_params(self) -> int:
        w = self.width
        qk = 2 * layernorm(self.hd) if self.qk_norm else 0
        return linear(w, 3 * w) + linear(w, w) + qk

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn
        return linear(self.width, f) + linear(f, self.width)

    def norm_params(self) -> int:
        return layernorm(self.width)

    def lora_targets(self) -> list[str]:
        return ["attn.qkv", "attn.o", "mlp.fc1", "mlp.fc2"]

    def default_lora_targets(self) -> list[str]:
        """`lora llm(rank = r)` without targets: the fused q/k/v projection (`query_key_value`)."""
        return ["attn.qkv"]

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA target, for counting adapter parameters."""
        w, f = self.width, self.ffn
        return {"attn.qkv": (w, 3 * w), "attn.o": (w, w), "mlp.fc1": (w, f), "mlp.fc2": (f, w)}

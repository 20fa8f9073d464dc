"""`phi`: Phi-1/2 (one LayerNorm, attention and FFN in parallel, partial rotary, a biased head)."""

from __future__ import annotations

from torch import Tensor

from vlmspec.compiler.schema.language import Phi
from vlmspec.runtime.language.causal_lm import register_family
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import DecoderLayer, Parts, PlainMLP, SelfAttention, norm
from vlmspec.runtime.language.moe import SparseMoE


class PhiParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, True, True, "dense")
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = PlainMLP(c.width, c.ffn, c.act)


class PhiLayer(DecoderLayer, PhiParts):
    parallel = True

    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.input_layernorm = norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.input_layernorm(h)


PHI = register_family(Family("phi", Phi, PhiLayer, PhiParts, gated_mlp=False, layer_norm=True, head_bias=True,
                             final_norm="final_layernorm"))

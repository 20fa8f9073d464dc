"""`llama`: Llama and the models that differ from it only in fields (Vicuna, Mistral, Qwen2)."""

from __future__ import annotations

from torch import Tensor

from vlmspec.compiler.schema.language import Llama
from vlmspec.runtime.language.causal_lm import register_family
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import DecoderLayer, GatedMLP, Parts, SelfAttention, norm
from vlmspec.runtime.language.moe import SparseMoE


class LlamaParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, c.qkv_bias, False, "o_proj")
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = GatedMLP(c.width, c.ffn, c.act)


class LlamaLayer(DecoderLayer, LlamaParts):
    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.input_layernorm = norm(c)
        self.post_attention_layernorm = norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.input_layernorm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.post_attention_layernorm(h)


LLAMA = register_family(Family("llama", Llama, LlamaLayer, LlamaParts))

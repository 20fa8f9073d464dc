"""`llama`: Llama and the models that differ from it only in fields (Vicuna, Mistral, Qwen2)."""

from __future__ import annotations

from vlmspec.compiler.schema.language import Llama
from vlmspec.runtime.language.causal_lm import register_family
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import GatedMLP, Parts, SelfAttention, TwoNormLayer


class LlamaParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, c.qkv_bias, False, "o_proj")
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = GatedMLP(c.width, c.ffn, c.act)


class LlamaLayer(TwoNormLayer, LlamaParts):
    pass


LLAMA = register_family(Family("llama", Llama, LlamaLayer, LlamaParts))

"""`gemma`: Llama's layers with Gemma's norms (scaled by 1 + weight) and embeddings scaled by sqrt(width)."""

from __future__ import annotations

from vlmspec.compiler.schema.language import Gemma
from vlmspec.runtime.language.causal_lm import register_family
from vlmspec.runtime.language.config import Family
from vlmspec.runtime.language.llama import LlamaLayer, LlamaParts

GEMMA = register_family(Family("gemma", Gemma, LlamaLayer, LlamaParts, norm_offset=True, embed_scale=True))

"""Language models: one shared decoder (`causal_lm.CausalLM`, `layers`), a file per family (`llama`,
`gemma`, `opt`, `phi`, `persimmon`), routed experts (`moe`) and M-RoPE positions (`mrope`); and two that
are not decoder-only transformers, each its own module: a state-space model (`mamba`) and an
encoder-decoder (`t5`). Importing this package registers every family's builder."""

from vlmspec.runtime.language import (  # noqa: F401  (registration)
    gemma,
    kosmos2,
    llama,
    mamba,
    opt,
    persimmon,
    phi,
    t5,
)
from vlmspec.runtime.language.causal_lm import CausalLM
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import LayerHooks, Parts

__all__ = ["CausalLM", "Family", "LMConfig", "LayerHooks", "Parts"]

"""Language models: one shared decoder (`causal_lm.CausalLM`, `layers`), a file per family (`llama`,
`gemma`, `opt`, `phi`), routed experts (`moe`) and M-RoPE positions (`mrope`). Importing this package
registers every family's builder."""

from vlmspec.runtime.language import gemma, llama, opt, phi  # noqa: F401  (registration)
from vlmspec.runtime.language.causal_lm import CausalLM
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import LayerHooks, Parts

__all__ = ["CausalLM", "Family", "LMConfig", "LayerHooks", "Parts"]

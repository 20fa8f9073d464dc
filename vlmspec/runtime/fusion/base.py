"""What every fusion style is: a module beside an unchanged language model, plugged in per decoder layer.

Each fusion owns its weights under its own component name (`layers.N.*`, keyed by decoder layer
index) and contributes `LayerHooks` that the language model's layers consult; no language-model key
changes, so a Hugging Face checkpoint of the language model still loads by key.
"""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.fusion import FusionBase
from vlmspec.diagnostics import user_error
from vlmspec.runtime.language import CausalLM, LayerHooks
from vlmspec.runtime.registry import BuildContext


class Fusion(nn.Module):
    """Base: `in_sequence` fusions put image features into the token sequence (spliced at image tokens)."""

    in_sequence: bool = True
    #: False when the fusion adds nothing inside the decoder layers (prefix), so a pass skips the hooks.
    reaches_layers: bool = True
    #: What the hooks read from `DecodeState`: image positions (visual expert), real tokens (MoE aux loss).
    uses_image_mask: bool = False
    uses_token_mask: bool = False
    #: True when the prompt (images + text) attends bidirectionally, the answer causally (prefix-LM).
    bidirectional_prefix: bool = False

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def contribute(self, hooks: list[LayerHooks]) -> None:
        """Add this fusion's per-layer pieces to `hooks` (one entry per decoder layer)."""


def language_model(ctx: BuildContext, comp: Component) -> CausalLM:
    llm = ctx.built.get(comp.target or "")
    if not isinstance(llm, CausalLM):
        raise user_error("E0592", f"fusion `{comp.name}` needs its language model built first")
    return llm


def fusion_spec(comp: Component, cls: type[FusionBase]) -> FusionBase:
    if not isinstance(comp.config, cls):
        raise user_error("E0592", f"`{comp.name}` is not a {cls.__name__} fusion")
    return comp.config

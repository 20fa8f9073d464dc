"""`prefix` (LLaVA, BLIP-2, PaliGemma): no weights; the model splices image features over the image-token
embeddings. With `prefix_attention = bidirectional` (PaliGemma) the prompt attends to itself in both
directions and the answer causally; the model builds that mask (`decoding.attention_mask_4d`)."""

from __future__ import annotations

from vlmspec.compiler.ir import Component
from vlmspec.runtime.fusion.base import Fusion
from vlmspec.runtime.registry import BuildContext, register


class PrefixFusion(Fusion):
    """LLaVA / BLIP-2: image features replace the image-token embeddings; nothing inside the layers."""

    reaches_layers = False

    def __init__(self, name: str, bidirectional_prefix: bool = False):
        super().__init__(name)
        self.bidirectional_prefix = bidirectional_prefix


@register("fusion", "prefix")
def build_prefix(comp: Component, ctx: BuildContext) -> PrefixFusion:
    return PrefixFusion(comp.name, getattr(comp.config, "prefix_attention", "causal") == "bidirectional")

"""`visual_expert` (CogVLM): per layer, a second set of QKV / output / FFN weights of the language model's
own family and shape, used at image-token positions."""

from __future__ import annotations

import torch
from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.fusion import VisualExpert
from vlmspec.diagnostics import user_error
from vlmspec.runtime.fusion.base import Fusion, fusion_spec, language_model
from vlmspec.runtime.language import CausalLM, LayerHooks
from vlmspec.runtime.registry import BuildContext, register


class VisualExpertFusion(Fusion):
    """CogVLM: `layers.N` holds QKV / output / FFN of the language model's shape for image positions;
    the layer norms stay shared, as in CogVLM."""

    uses_image_mask = True

    def __init__(self, name: str, llm: CausalLM, spec: VisualExpert):
        super().__init__(name)
        self.layer_ids = spec.layer_ids(llm.c.depth)
        self.layers = nn.ModuleDict({str(i): llm.make_parts() for i in self.layer_ids})

    def contribute(self, hooks: list[LayerHooks]) -> None:
        for i in self.layer_ids:
            if hooks[i].expert is not None or hooks[i].moe is not None:
                raise user_error("E0597", f"decoder layer {i} gets a visual expert from `{self.name}` and another "
                                 "fusion's weights", help="give each decoder layer at most one fusion that "
                                 "replaces its weights")
            hooks[i].expert = self.layers[str(i)]

    def init_from_llm(self, llm: CausalLM) -> None:
        """Start every expert as a copy of its layer's own weights (CogVLM's initialisation)."""
        with torch.no_grad():
            for i in self.layer_ids:
                own = {k: v for k, v in llm.layers[i].state_dict().items()
                       if k in self.layers[str(i)].state_dict()}
                self.layers[str(i)].load_state_dict(own)


@register("fusion", "visual_expert")
def build_visual_expert(comp: Component, ctx: BuildContext) -> VisualExpertFusion:
    return VisualExpertFusion(comp.name, language_model(ctx, comp), fusion_spec(comp, VisualExpert))

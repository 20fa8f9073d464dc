"""`moe` (MoE-LLaVA): prefix splicing plus routed experts replacing the FFN of chosen layers; expert 0 is
the layer's own dense FFN (see `vlmspec.runtime.language.moe`)."""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.fusion import MoEFusion
from vlmspec.diagnostics import user_error
from vlmspec.runtime.fusion.base import Fusion, fusion_spec, language_model
from vlmspec.runtime.language import CausalLM, LayerHooks
from vlmspec.runtime.language.moe import SparseMoE
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import CLAIM, SpecPart


class MoEFusionModule(Fusion):
    """MoE-LLaVA: prefix splicing, and `layers.N` = router + experts 1..E-1 (+ shared experts) replacing
    decoder layer N's FFN; expert 0 is that layer's dense FFN."""

    uses_token_mask = True

    def __init__(self, name: str, llm: CausalLM, spec: MoEFusion):
        super().__init__(name)
        self.layer_ids = spec.layer_ids(llm.c.depth)
        c = llm.c
        self.layers = nn.ModuleDict({
            str(i): llm.make_moe(spec.experts, spec.top_k, spec.shared, spec.aux_loss, c.ffn, dense0=True)
            for i in self.layer_ids
        })

    def contribute(self, hooks: list[LayerHooks]) -> None:
        for i in self.layer_ids:
            if hooks[i].expert is not None or hooks[i].moe is not None:
                raise user_error("E0597", f"decoder layer {i} gets experts from `{self.name}` and another fusion's "
                                 "weights", help="give each decoder layer at most one fusion that replaces its weights")
            hooks[i].moe = self.layers[str(i)]

    def moe_pairs(self, llm: CausalLM) -> list[tuple[SparseMoE, nn.Module]]:
        return [(self.layers[str(i)], llm.layers[i]) for i in self.layer_ids]

    def claims(self, model: nn.Module) -> list[SpecPart]:
        """The dense FFNs of this fusion's layers: each is its layer's expert 0, so the path naming this
        fusion covers them too (vlmspec.runtime.spec_paths)."""
        llm = model.llm  # type: ignore[attr-defined]
        return [SpecPart("", [m for i in self.layer_ids for m in llm.layers[i].ffn_modules()], CLAIM)]


@register("fusion", "moe")
def build_moe(comp: Component, ctx: BuildContext) -> MoEFusionModule:
    return MoEFusionModule(comp.name, language_model(ctx, comp), fusion_spec(comp, MoEFusion))

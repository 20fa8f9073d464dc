"""`patch_merger`: Qwen2-VL's merger (RMSNorm in Qwen2.5-VL's: `norm = rms`). LayerNorm per patch, each merge x merge block of patches
concatenated into one token, then an MLP. Keys: `ln_q`, `mlp.0`, `mlp.2` (Qwen2-VL's `PatchMerger`)."""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.connectors import PatchMerger
from vlmspec.runtime.blocks import RMSNorm, VisualTokens, mlp_stack
from vlmspec.runtime.connectors.base import Connector, Instruction, space_to_depth
from vlmspec.runtime.registry import BuildContext, register


class PatchMergerConnector(Connector):
    """[n x (gh*gw) x d] -> [n x (gh/m * gw/m) x out]."""

    def __init__(self, name: str, cfg: PatchMerger, d: int, out_width: int):
        super().__init__(name, "concat")
        self.factor = cfg.merge
        merged = d * cfg.merge**2
        self.ln_q: nn.Module | None = None
        if cfg.norm:
            self.ln_q = RMSNorm(d, eps=1e-6) if cfg.norm == "rms" else nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(*mlp_stack(merged, cfg.hidden or merged, out_width, cfg.layers, cfg.act))

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        gh, gw = self.need_grid(x, self.factor, "merge")
        h = self.ln_q(x.x) if self.ln_q is not None else x.x
        h = space_to_depth(h, (gh, gw), self.factor)
        return VisualTokens(self.mlp(h), (gh // self.factor, gw // self.factor))


@register("connector", "patch_merger")
def build_patch_merger(comp: Component, ctx: BuildContext) -> PatchMergerConnector:
    # `merge` is this kind's block size, so several sources are concatenated along width
    return PatchMergerConnector(comp.name, comp.config, sum(s.width for s in ctx.source_shapes(comp.name)),
                                ctx.output_shape(comp.name).width)

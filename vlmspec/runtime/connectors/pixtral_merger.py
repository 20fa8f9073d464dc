"""`pixtral_merger`: Mistral 3's projector. RMSNorm per patch, each merge x merge block of the patch grid
concatenated channel-major (a patch's features innermost: feature c of block position (i, j) lands at
c * merge^2 + i * merge + j, as `torch.nn.functional.unfold` orders them) through the bias-free
`patch_merger.merging_layer`, then `linear_1`, the activation, `linear_2`. Keys as `Mistral3MultiModalProjector`
holds them, so the projector's checkpoint loads by key."""

from __future__ import annotations

from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.pixtral import PixtralMerger
from vlmspec.runtime.blocks import RMSNorm, VisualTokens, activation
from vlmspec.runtime.connectors.base import Connector, Instruction
from vlmspec.runtime.registry import BuildContext, register


def merge_channel_major(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """[n x (gh*gw) x d] -> [n x (gh/s * gw/s) x (d*s*s)], blocks row by row, each block's features
    channel-major (unfold's order; `space_to_depth` is patch-major)."""
    n, _, d = x.shape
    gh, gw = grid
    x = x.reshape(n, gh // s, s, gw // s, s, d).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, (gh // s) * (gw // s), d * s * s)


class PatchMerge(nn.Module):
    """The merging layer under Mistral 3's key (`patch_merger.merging_layer`)."""

    def __init__(self, d: int, merge: int):
        super().__init__()
        self.merging_layer = nn.Linear(d * merge * merge, d, bias=False)


class PixtralMergerConnector(Connector):
    """[n x (gh*gw) x d] -> [n x (gh/m * gw/m) x out], the merged grid kept."""

    def __init__(self, name: str, cfg: PixtralMerger, d: int, out_width: int):
        super().__init__(name, "concat")
        self.factor = cfg.merge
        self.norm = RMSNorm(d, eps=cfg.norm_eps)
        self.patch_merger = PatchMerge(d, cfg.merge)
        dims = [d, *[out_width] * cfg.layers]
        for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
            self.add_module(f"linear_{i + 1}", nn.Linear(a, b, bias=cfg.bias))
        self.layers = cfg.layers
        self.act = activation(cfg.act)

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        gh, gw = self.need_grid(x, self.factor, "merge")
        h = merge_channel_major(self.norm(x.x), (gh, gw), self.factor)
        h = self.patch_merger.merging_layer(h)
        for i in range(self.layers):
            if i:
                h = self.act(h)
            h = getattr(self, f"linear_{i + 1}")(h)
        return VisualTokens(h, (gh // self.factor, gw // self.factor))


@register("connector", "pixtral_merger")
def build_pixtral_merger(comp: Component, ctx: BuildContext) -> PixtralMergerConnector:
    return PixtralMergerConnector(comp.name, comp.config, sum(s.width for s in ctx.source_shapes(comp.name)),
                                  ctx.output_shape(comp.name).width)

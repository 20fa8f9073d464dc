"""What every connector shares: merging several sources into one input, dtype, and grid helpers.

A connector module implements `project(tokens)`; `forward` first merges its sources the way the spec
says (`merge = concat | sum | sequence`) so no connector has to care how many encoders feed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens, param_dtype


@dataclass(slots=True)
class Instruction:
    """Instruction text for instruction-aware connectors (InstructBLIP's Q-Former): ids [n x l], mask [n x l]."""

    ids: Tensor
    mask: Tensor | None = None


def merge_sources(parts: list[VisualTokens], how: str, name: str) -> VisualTokens:
    """Several sources -> one input: `concat` along width, `sum`, or `sequence` (along tokens).

    concat / sum keep the patch grid when all sources share it; sequence has no single grid.
    """
    if len(parts) == 1:
        return parts[0]
    if how == "sequence":
        return VisualTokens(torch.cat([p.x for p in parts], dim=1), None)
    counts = [p.x.shape[1] for p in parts]
    if len(set(counts)) > 1:
        raise user_error("E0594", f"connector `{name}` merges sources with {' and '.join(map(str, counts))} tokens "
                         f"(merge = {how} needs equal counts)", help="use `merge = sequence`, or equal image sizes")
    grids = {p.grid for p in parts}
    grid = parts[0].grid if len(grids) == 1 else None
    if how == "sum":
        out = parts[0].x
        for p in parts[1:]:
            out = out + p.x
        return VisualTokens(out, grid)
    return VisualTokens(torch.cat([p.x for p in parts], dim=-1), grid)


class Connector(nn.Module):
    """Base of every connector: merge the sources, cast to this connector's dtype, then `project`."""

    def __init__(self, name: str, merge: str):
        super().__init__()
        self.name = name
        self.merge = merge

    def project(self, x: VisualTokens, instruction: Instruction | None = None) -> VisualTokens:
        """The connector's own computation on the merged input; every connector kind defines it."""
        raise TypeError(f"{type(self).__name__} must define `project`")

    def forward(self, sources: list[VisualTokens], instruction: Instruction | None = None) -> VisualTokens:
        x = merge_sources(sources, self.merge, self.name)
        x = VisualTokens(x.x.to(param_dtype(self)), x.grid)
        return self.project(x, instruction)

    def need_grid(self, x: VisualTokens, factor: int, field: str) -> tuple[int, int]:
        """The patch grid, checked to be divisible by `factor`; a user error when there is none."""
        if x.grid is None:
            raise user_error("E0595", f"connector `{self.name}` pools over the patch grid, but its input is not a grid",
                             help="select `.patches` on the encoder (drop the class token) and use one source "
                             "or `merge = concat`")
        gh, gw = x.grid
        if gh % factor or gw % factor:
            raise user_error("E0595", f"connector `{self.name}`: a {gh}x{gw} patch grid is not divisible by "
                             f"{field} = {factor}", help=f"use image sizes whose grid is a multiple of {factor}")
        return gh, gw


def to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """[n x t x d] -> [n x d x gh x gw] (channels first, for convolutions and pooling)."""
    n, _, d = x.shape
    return x.transpose(1, 2).reshape(n, d, grid[0], grid[1])


def from_grid(x: Tensor) -> Tensor:
    """[n x d x gh x gw] -> [n x t x d]."""
    return x.flatten(2).transpose(1, 2)


def space_to_depth(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """[n x (gh*gw) x d] -> [n x (gh/s * gw/s) x (s*s*d)]: each s x s block of tokens becomes one token,
    its tokens concatenated row by row (the order of Qwen2-VL's merger)."""
    n, _, d = x.shape
    gh, gw = grid
    x = x.reshape(n, gh // s, s, gw // s, s, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (gh // s) * (gw // s), s * s * d)

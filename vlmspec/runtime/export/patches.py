"""Export-only stand-ins for the few model pieces whose eager form has data-dependent control flow.

`SparseMoE.forward` gathers the rows each expert got (`nonzero`) and skips experts with none
(`if rows.numel() == 0`): a branch on a value only known at run time, which `torch.export` refuses
and TensorRT could not build anyway. The stand-in runs every expert on every token and weights each
output by the router weight it got (0 when not chosen): the same sum in the same expert order, so
its outputs match eager to float rounding, at E x the FFN work for E experts (fine for MoE-LLaVA's 4;
an exported many-expert model would want a grouped-GEMM kernel instead).

The swap is a class change on the live modules for the duration of the trace, restored after it, so
no weights are copied and the eager model is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vlmspec.runtime.language.moe import SparseMoE


class DenseRoutedMoE(SparseMoE):
    """`SparseMoE` with routing as a weighted sum over all experts (no data-dependent shapes)."""

    def forward(self, x: Tensor, dense: Callable[[Tensor], Tensor] | None = None,
                token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            w = (weights * (chosen == e)).sum(-1, keepdim=True)  # [n x 1], 0 where expert e was not picked
            out = out + self.expert(e, dense)(flat) * w.to(flat.dtype)
        for sh in self.shared_experts:
            out = out + sh(flat)
        return out.reshape(shape), flat.new_zeros(())  # no aux loss at inference


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {SparseMoE: DenseRoutedMoE}


@contextmanager
def exportable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s modules with data-dependent forwards use their export stand-ins."""
    swapped: list[tuple[nn.Module, type[nn.Module]]] = []
    try:
        for m in model.modules():
            new = _SWAPS.get(type(m))
            if new is not None:
                swapped.append((m, type(m)))
                m.__class__ = new
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls

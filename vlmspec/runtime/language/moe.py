"""Routed expert FFNs: a top-k router, experts, optional shared experts, a load-balancing loss, and
up-cycling (every expert starts as a copy of the dense FFN it replaces, as in MoE-LLaVA).

When the experts have the dense FFN's size, expert 0 *is* the layer's own dense FFN: the layer keeps
its `mlp` (so a dense checkpoint loads by key and the closed-form counts, which book the dense FFN
under the language model, hold) and the MoE module owns experts 1..E-1. With another expert size
the MoE module owns all E experts and the layer has no dense FFN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.diagnostics import user_error

FFN = Callable[[Tensor], Tensor]


class SparseMoE(nn.Module):
    """Top-k routing over E experts. x: [b x s x w] -> ([b x s x w], weighted aux loss []).

    Top-1 routing scales by the raw router probability (Switch / DeepSpeed), top-k > 1 renormalises the
    k probabilities to sum to 1 (Mixtral, MoE-LLaVA's top-2), so an up-cycled layer starts out
    computing exactly its dense FFN.
    """

    def __init__(self, width: int, experts: int, top_k: int, shared: int, aux_weight: float,
                 make_expert: Callable[[], nn.Module], make_shared: Callable[[], nn.Module], dense_is_expert0: bool):
        super().__init__()
        self.n_experts = experts
        self.top_k = top_k
        self.aux_weight = aux_weight
        self.dense_is_expert0 = dense_is_expert0
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList([make_expert() for _ in range(experts - (1 if dense_is_expert0 else 0))])
        self.shared_experts = nn.ModuleList([make_shared() for _ in range(shared)])

    def expert(self, e: int, dense: FFN | None) -> FFN:
        if self.dense_is_expert0:
            if e == 0:
                if dense is None:
                    raise user_error("E0507", "this MoE layer routes to the dense FFN as expert 0, but none was given")
                return dense
            return self.experts[e - 1]
        return self.experts[e]

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities [n x E], the top-k weights [n x k] (renormalised when k > 1) and experts [n x k]."""
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, weights, chosen

    def forward(self, x: Tensor, dense: FFN | None = None, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = self.expert(e, dense)(flat[rows]) * weights[rows, slot, None].to(flat.dtype)
            out = out.index_add(0, rows, y)
        for sh in self.shared_experts:
            out = out + sh(flat)
        aux = self.balance_loss(probs, chosen, token_mask)
        return out.reshape(shape), self.aux_weight * aux

    def balance_loss(self, probs: Tensor, chosen: Tensor, token_mask: Tensor | None) -> Tensor:
        """E * sum_e f_e * P_e over real tokens: f_e the share of tokens routed to e, P_e its mean probability
        (Switch Transformer / Mixtral); k at perfect balance, larger when routing collapses."""
        picked = F.one_hot(chosen, self.n_experts).sum(1).float()  # [n x E]
        if token_mask is not None:
            m = token_mask.reshape(-1, 1).float()
            denom = m.sum().clamp(min=1.0)
            f, p = (picked * m).sum(0) / denom, (probs * m).sum(0) / denom
        else:
            f, p = picked.mean(0), probs.mean(0)
        return self.n_experts * (f * p).sum()


def upcycle_pairs(pairs: Iterable[tuple[SparseMoE, dict[str, Tensor]]]) -> int:
    """Copy each dense FFN (given as its state dict, in the experts' key layout) into every expert of its
    MoE layer; shared experts get a zero output projection, so the up-cycled layer computes exactly the
    dense FFN at step 0. Returns the number of experts written."""
    written = 0
    with torch.no_grad():
        for moe, dense_state in pairs:
            if not moe.dense_is_expert0:
                raise user_error("E0508", "cannot up-cycle: the experts' ffn differs from the dense FFN's",
                                 help="leave the moe block's `ffn` unset to up-cycle")
            for expert in moe.experts:
                expert.load_state_dict(dense_state)
                written += 1
            for sh in moe.shared_experts:
                zero = getattr(sh, "zero_output_", None)
                if callable(zero):
                    zero()
    return written


def upcycle(model: nn.Module) -> int:
    """Initialise every expert of `model` (a `VisionLanguageModel`: the language model's own `moe` block and
    MoE fusions) from the dense FFN it replaces. Returns the number of experts written."""
    pairs = getattr(model, "moe_pairs", None)
    if pairs is None:
        raise user_error("E0508", "up-cycling needs a VisionLanguageModel")
    return upcycle_pairs((moe, layer.ffn_state() if layer.has_ffn else {}) for moe, layer in pairs())

"""The decoder layer every family shares, its parts and the hook points fusions route per token.

A family's layer is `DecoderLayer` on the family's `Parts` (attention projections and FFN); a visual
expert (CogVLM) is another instance of the same parts class, so it has exactly the layer's shapes and
keys. Layers expose three hook points, `qkv`, `attn_out` and `ffn`, which fusions route per token
(`LayerHooks`): the language model's code and weights stay unchanged, as in torchtune's fusion wrappers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlmspec.runtime.blocks import RMSNorm, activation, attend, split_heads
from vlmspec.runtime.decoding import DecodeState
from vlmspec.runtime.language.config import LMConfig
from vlmspec.runtime.language.moe import SparseMoE


class SelfAttention(nn.Module):
    """q, k, v and output projections; the output's key differs by family (`o_proj`, `out_proj`, `dense`)."""

    def __init__(self, c: LMConfig, qkv_bias: bool, out_bias: bool, out_name: str):
        super().__init__()
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.width, q, bias=qkv_bias)
        self.k_proj = nn.Linear(c.width, kv, bias=qkv_bias)
        self.v_proj = nn.Linear(c.width, kv, bias=qkv_bias)
        self.add_module(out_name, nn.Linear(q, c.width, bias=out_bias))
        self.out_name = out_name

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def out(self, o: Tensor) -> Tensor:
        return getattr(self, self.out_name)(o)


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, width: int, ffn: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.gate_proj = nn.Linear(width, ffn, bias=False)
        self.up_proj = nn.Linear(width, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.down_proj.weight)


class PlainMLP(nn.Module):
    """fc2(act(fc1(x))) with biases (OPT, Phi)."""

    def __init__(self, width: int, ffn: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class Parts(nn.Module):
    """A layer's attention projections and FFN; the hook points fusions route per token.

    `has_ffn` is False in MoE layers whose experts differ in size from the dense FFN (no dense FFN there).
    """

    has_ffn: bool = True

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.qkv(x)

    def attn_out(self, o: Tensor) -> Tensor:
        return self.self_attn.out(o)

    def ffn(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    def ffn_state(self) -> dict[str, Tensor]:
        """The dense FFN's weights in an expert's key layout (for up-cycling)."""
        return self.mlp.state_dict()

    def ffn_modules(self) -> list[nn.Module]:
        """The modules of the dense FFN (spec path `mlp`); none in a layer whose experts replace it."""
        return [self.mlp] if self.has_ffn else []

    def lora_linears(self) -> dict[str, nn.Module]:
        """LoRA target (`attn.q`, `mlp.down`) -> the linear layer implementing it in this layer."""
        a = self.self_attn
        out: dict[str, nn.Module] = {"attn.q": a.q_proj, "attn.k": a.k_proj, "attn.v": a.v_proj,
                                     "attn.o": getattr(a, a.out_name)}
        mlp = self.ffn_modules()
        if len(mlp) == 1 and isinstance(mlp[0], GatedMLP):
            out.update({"mlp.gate": mlp[0].gate_proj, "mlp.up": mlp[0].up_proj, "mlp.down": mlp[0].down_proj})
        elif len(mlp) == 1:
            out.update({"mlp.fc1": mlp[0].fc1, "mlp.fc2": mlp[0].fc2})
        elif len(mlp) == 2:
            out.update({"mlp.fc1": mlp[0], "mlp.fc2": mlp[1]})
        return out


@dataclass(slots=True)
class LayerHooks:
    """What fusions add to one decoder layer: blocks run before it (gated cross-attention), a visual
    expert (per-token QKV / output / FFN for image positions), or routed experts replacing its FFN."""

    before: list[Callable[[Tensor, DecodeState], Tensor]] = field(default_factory=list)
    expert: Parts | None = None
    moe: SparseMoE | None = None


def route(base: Callable, expert: Callable | None, x: Tensor, mask: Tensor | None):
    """Apply `expert` at image positions (mask [b x s] True) and `base` elsewhere; x: [b x s x w].

    Outputs may be a tensor or a tuple of tensors (q, k, v). Each side runs only on its own tokens.
    """
    if expert is None or mask is None:
        return base(x)
    img, txt = expert(x[mask]), base(x[~mask])

    def merge(a: Tensor, b: Tensor) -> Tensor:
        out = b.new_empty(*x.shape[:-1], b.shape[-1])
        out[mask] = a
        out[~mask] = b
        return out

    if isinstance(txt, tuple):
        return tuple(merge(a, b) for a, b in zip(img, txt, strict=True))
    return merge(img, txt)


class DecoderLayer:
    """The forward pass shared by every family (a mixin on a `Parts` module).

    Sequential families: h + attn(norm1(h)), then + ffn(norm2(h)). Phi (`parallel`): h + attn(n) + ffn(n)
    with one norm n = norm1(h).
    """

    parallel: bool = False
    c: LMConfig
    moe: SparseMoE | None

    def attn_norm(self, h: Tensor) -> Tensor:
        """The family's pre-attention norm; each family's `Parts` module defines it."""
        raise TypeError(f"{type(self).__name__} must define `attn_norm`")

    def mlp_norm(self, h: Tensor) -> Tensor:
        """The family's pre-FFN norm; each family's `Parts` module defines it."""
        raise TypeError(f"{type(self).__name__} must define `mlp_norm`")

    def forward(self, h: Tensor, state: DecodeState, idx: int, hooks: LayerHooks | None = None) -> Tensor:
        expert = hooks.expert if hooks is not None else None
        x = self.attn_norm(h)
        q, k, v = route(self.qkv, expert.qkv if expert else None, x, state.image_mask)
        q, k, v = split_heads(q, self.c.heads), split_heads(k, self.c.kv_heads), split_heads(v, self.c.kv_heads)
        q, k = self.qk_norm(q, k)
        if state.rotary is not None:
            q, k = state.rotary.apply(q, k)
        if state.cache is not None:
            k, v = state.cache.update(idx, k, v)
        o = attend(q, k, v, state.mask, state.causal)
        a = route(self.attn_out, expert.attn_out if expert else None, o, state.image_mask)
        if self.parallel:
            return h + a + self.run_ffn(x, state, hooks)
        h = h + a
        return h + self.run_ffn(self.mlp_norm(h), state, hooks)

    def qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head queries and keys [b x h x s x d] before the rotary; a family with q/k norms (Persimmon)
        normalises them here, the others pass them through."""
        return q, k

    def run_ffn(self, x: Tensor, state: DecodeState, hooks: LayerHooks | None) -> Tensor:
        moe = hooks.moe if hooks is not None and hooks.moe is not None else self.moe
        if moe is not None:
            y, aux = moe(x, self.ffn if self.has_ffn else None, state.token_mask)
            state.aux.append(aux)
            return y
        expert = hooks.expert if hooks is not None else None
        return route(self.ffn, expert.ffn if expert else None, x, state.image_mask)


class TwoNormLayer(DecoderLayer):
    """A sequential layer with its own norm before the attention (`input_layernorm`) and before the FFN
    (`post_attention_layernorm`), Hugging Face's names for Llama's and Persimmon's: mixed in before a
    family's `Parts` (`class LlamaLayer(TwoNormLayer, LlamaParts)`), whose constructor builds the rest."""

    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)  # the family's Parts
        self.c = c
        self.input_layernorm = norm(c)
        self.post_attention_layernorm = norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.input_layernorm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.post_attention_layernorm(h)


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU (Primer; Persimmon's MLP): relu(x) ** 2."""
    return torch.square(torch.relu(x))


def norm(c: LMConfig) -> nn.Module:
    """The family's norm: LayerNorm (OPT, Phi) or RMSNorm (Gemma's scaling by 1 + weight)."""
    return nn.LayerNorm(c.width, eps=c.eps) if c.layer_norm else RMSNorm(c.width, c.eps, offset=c.norm_offset)


def make_mlp(c: LMConfig, ffn: int | None = None) -> nn.Module:
    """The family's FFN at width `ffn` (default: the dense FFN's)."""
    f = ffn or c.ffn
    return GatedMLP(c.width, f, c.act) if c.gated_mlp else PlainMLP(c.width, f, c.act)

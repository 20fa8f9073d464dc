"""`persimmon`: Persimmon (Fuyu's decoder) as the shared decoder plus its deltas.

What differs from Llama: LayerNorm with bias; one fused `query_key_value` projection whose output holds, head
by head, that head's q, k and v side by side; a LayerNorm over each head's queries and keys before the
rotary (`qk_layernorm`); rotary on the first `partial_rotary` of each head; a squared-ReLU MLP with biases
(`dense_h_to_4h`, `dense_4h_to_h`); `model.final_layernorm`. Keys are Hugging Face's, so a Persimmon
checkpoint (or a Fuyu one's `language_model`) loads by key.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.persimmon import Persimmon
from vlmspec.diagnostics import user_error
from vlmspec.runtime.language.causal_lm import CausalLM
from vlmspec.runtime.language.config import Family, LMConfig, lm_config
from vlmspec.runtime.language.layers import Parts, TwoNormLayer, relu2
from vlmspec.runtime.registry import BuildContext, register

_ACTS = {"relu2": relu2, "relu": F.relu, "gelu": F.gelu}


class FusedQKV(nn.Module):
    """`query_key_value` [w -> 3w] laid out [heads x (q, k, v) x head_dim], and the output `dense`."""

    def __init__(self, c: LMConfig, qk_norm: bool):
        super().__init__()
        self.heads, self.hd = c.heads, c.head_dim
        self.query_key_value = nn.Linear(c.width, 3 * c.heads * c.head_dim)
        self.dense = nn.Linear(c.heads * c.head_dim, c.width)
        self.out_name = "dense"
        if qk_norm:
            self.q_layernorm = nn.LayerNorm(c.head_dim, eps=c.eps)
            self.k_layernorm = nn.LayerNorm(c.head_dim, eps=c.eps)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fused = self.query_key_value(x)
        b, s, _ = fused.shape
        per = fused.view(b, s, self.heads, 3, self.hd)
        return tuple(per[..., i, :].reshape(b, s, -1) for i in range(3))  # type: ignore[return-value]

    def out(self, o: Tensor) -> Tensor:
        return self.dense(o)


class PersimmonMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))), both biased; the activation squared ReLU."""

    def __init__(self, width: int, ffn: int, act: str):
        super().__init__()
        self.act = _ACTS[act]
        self.dense_h_to_4h = nn.Linear(width, ffn)
        self.dense_4h_to_h = nn.Linear(ffn, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.dense_4h_to_h.weight)
        nn.init.zeros_(self.dense_4h_to_h.bias)


@dataclasses.dataclass(frozen=True, slots=True)
class PersimmonConfig(LMConfig):
    """The shared numbers and Persimmon's one more: whether each head's q and k are LayerNormed."""

    qk_norm: bool = True


def _qk_norm(c: LMConfig) -> bool:
    return bool(getattr(c, "qk_norm", False))


class PersimmonParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = FusedQKV(c, _qk_norm(c))
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = PersimmonMLP(c.width, c.ffn, c.act)

    def lora_linears(self) -> dict[str, nn.Module]:
        a = self.self_attn
        out: dict[str, nn.Module] = {"attn.qkv": a.query_key_value, "attn.o": a.dense}
        if self.has_ffn:
            out.update({"mlp.fc1": self.mlp.dense_h_to_4h, "mlp.fc2": self.mlp.dense_4h_to_h})
        return out


class PersimmonLayer(TwoNormLayer, PersimmonParts):
    def qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        a = self.self_attn
        if not hasattr(a, "q_layernorm"):
            return q, k
        return a.q_layernorm(q), a.k_layernorm(k)


class PersimmonLM(CausalLM):
    """The shared decoder; its fusion factories make Persimmon's own FFN."""

    def make_ffn(self, ffn: int | None = None) -> nn.Module:
        return PersimmonMLP(self.c.width, ffn or self.c.ffn, self.c.act)


PERSIMMON = Family("persimmon", Persimmon, PersimmonLayer, PersimmonParts, gated_mlp=False, layer_norm=True,
                   final_norm="final_layernorm")


@register("language", "persimmon")
def build_persimmon(comp: Component, ctx: BuildContext) -> PersimmonLM:
    cfg = comp.config
    if not isinstance(cfg, Persimmon):
        raise user_error("E0592", f"`{comp.name}` is not a persimmon model")
    base = dataclasses.replace(lm_config(cfg, PERSIMMON), rotary_dim=cfg.rotary_dim, act=cfg.act)
    c = PersimmonConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, qk_norm=cfg.qk_norm)
    return PersimmonLM(c, PERSIMMON, cfg.moe)

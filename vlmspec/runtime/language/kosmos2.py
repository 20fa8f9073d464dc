"""`kosmos2`: Kosmos-2's text decoder as the shared decoder plus its deltas.

What differs from Llama, and why a block of its own: positions are a fixed sinusoidal table (no rotary, no
parameters) read at `position + pad_id + 1`, and they are added after the image features are spliced in,
which are scaled by sqrt(width) with the token embeddings; so `embed` returns unscaled embeddings and
`add_positions` (which the model calls after the splice) scales and adds the table. Each layer is pre-LN with
LayerNorms (`self_attn_layer_norm`, `final_layer_norm`), biased q/k/v/out projections with a LayerNorm on the
attention output (`self_attn.inner_attn_ln`) and an FFN whose hidden activations are LayerNormed
(`ffn.ffn_layernorm`): the shared `SelfAttention` and `DecoderLayer` carry the rest. Keys are Hugging Face's
`Kosmos2TextForCausalLM` ones (`model.layers.N.*`, `model.layer_norm`, `lm_head`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.kosmos2 import Kosmos2
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import activation
from vlmspec.runtime.language.causal_lm import CausalLM
from vlmspec.runtime.language.config import Family, LMConfig, lm_config
from vlmspec.runtime.language.layers import DecoderLayer, Parts, SelfAttention
from vlmspec.runtime.registry import BuildContext, register


class Kosmos2FFN(nn.Module):
    """fc2(LayerNorm(act(fc1(x)))), both linears biased."""

    def __init__(self, width: int, ffn: int, act: str, eps: float):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, ffn)
        self.ffn_layernorm = nn.LayerNorm(ffn, eps=eps)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.ffn_layernorm(self.act(self.fc1(x))))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class Kosmos2Parts(Parts):
    """Biased q/k/v/out projections with `inner_attn_ln` before `out_proj`; the FFN under HF's key `ffn`."""

    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, qkv_bias=True, out_bias=True, out_name="out_proj")
        self.self_attn.inner_attn_ln = nn.LayerNorm(c.width, eps=c.eps)
        self.has_ffn = with_ffn
        if with_ffn:
            self.ffn = Kosmos2FFN(c.width, c.ffn, c.act, c.eps)  # type: ignore[assignment]

    # HF names the FFN module `ffn`, which is also the hook `Parts.ffn(x)`: the module itself is that hook
    @property
    def ffn(self) -> nn.Module:  # type: ignore[override]
        return self._modules["ffn"]

    def attn_out(self, o: Tensor) -> Tensor:
        a = self.self_attn
        return a.out_proj(a.inner_attn_ln(o))

    def ffn_state(self) -> dict[str, Tensor]:
        return self._modules["ffn"].state_dict()

    def ffn_modules(self) -> list[nn.Module]:
        return [self._modules["ffn"]] if self.has_ffn else []


class Kosmos2Layer(DecoderLayer, Kosmos2Parts):
    """h + attn(self_attn_layer_norm(h)), then + ffn(final_layer_norm(h))."""

    def __init__(self, c: LMConfig, moe: None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.self_attn_layer_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.moe = None

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.self_attn_layer_norm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.final_layer_norm(h)


def sinusoid(pos: Tensor, dim: int) -> Tensor:
    """The fairseq / tensor2tensor table [.. x dim] at integer positions: sin of every frequency, then cos (and
    a zero column when dim is odd)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=pos.device).float() * -(math.log(10000) / (half - 1)))
    angle = pos.float()[..., None] * freq
    parts = [torch.sin(angle), torch.cos(angle)]
    if dim % 2:
        parts.append(angle.new_zeros(*angle.shape[:-1], 1))
    return torch.cat(parts, dim=-1)


@dataclasses.dataclass(frozen=True, slots=True)
class Kosmos2Config(LMConfig):
    """The shared numbers and Kosmos-2's two more: the padding offset of positions and the embedding scale."""

    pad_id: int = 1
    scale_embed: bool = True


class Kosmos2LM(CausalLM):
    """The shared decoder with Kosmos-2's embedding scale and sinusoidal positions (after the splice)."""

    c: Kosmos2Config

    def add_positions(self, h: Tensor, pos: Tensor) -> Tensor:
        c = self.c
        if c.scale_embed:
            h = h * math.sqrt(c.width)
        p = pos if pos.dim() == 2 else pos[0]
        return h + sinusoid(p + c.pad_id + 1, c.width).to(h.dtype)

    def make_ffn(self, ffn: int | None = None) -> nn.Module:
        return Kosmos2FFN(self.c.width, ffn or self.c.ffn, self.c.act, self.c.eps)


KOSMOS2 = Family("kosmos2", Kosmos2, Kosmos2Layer, Kosmos2Parts, gated_mlp=False, layer_norm=True,
                 final_norm="layer_norm")


@register("language", "kosmos2")
def build_kosmos2(comp: Component, ctx: BuildContext) -> Kosmos2LM:
    cfg = comp.config
    if not isinstance(cfg, Kosmos2):
        raise user_error("E0592", f"`{comp.name}` is not a kosmos2 model")
    base = dataclasses.replace(lm_config(cfg, KOSMOS2), rotary_dim=0, qkv_bias=True, act=cfg.act)
    c = Kosmos2Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, pad_id=cfg.pad_id,
                      scale_embed=cfg.scale_embed)
    return Kosmos2LM(c, KOSMOS2, None)

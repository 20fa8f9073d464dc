"""`opt`: OPT (LayerNorm, learned absolute positions, the FFN on the layer, `model.decoder.*` keys)."""

from __future__ import annotations

from torch import Tensor, nn

from vlmspec.compiler.schema.language import OPT
from vlmspec.runtime.blocks import activation
from vlmspec.runtime.language.causal_lm import register_family
from vlmspec.runtime.language.config import Family, LMConfig
from vlmspec.runtime.language.layers import DecoderLayer, Parts, SelfAttention, norm
from vlmspec.runtime.language.moe import SparseMoE


class OPTParts(Parts):
    """OPT keeps its FFN directly on the layer (`fc1`, `fc2`), as Hugging Face does."""

    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.act = activation(c.act)
        self.self_attn = SelfAttention(c, True, True, "out_proj")
        self.has_ffn = with_ffn
        if with_ffn:
            self.fc1 = nn.Linear(c.width, c.ffn)
            self.fc2 = nn.Linear(c.ffn, c.width)

    def ffn(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def ffn_state(self) -> dict[str, Tensor]:
        return {f"{m}.{p}": t for m in ("fc1", "fc2") for p, t in getattr(self, m).state_dict().items()}

    def ffn_modules(self) -> list[nn.Module]:
        return [self.fc1, self.fc2] if self.has_ffn else []


class OPTLayer(DecoderLayer, OPTParts):
    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.self_attn_layer_norm = norm(c)
        self.final_layer_norm = norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.self_attn_layer_norm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.final_layer_norm(h)


OPT_FAMILY = register_family(Family("opt", OPT, OPTLayer, OPTParts, gated_mlp=False, layer_norm=True,
                                     learned_positions=True, final_norm="final_layer_norm"))

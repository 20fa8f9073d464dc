"""Small building blocks every family shares: activations, norms, rotary embeddings, attention.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`, so the fused CPU and
GPU kernels are used and one place decides masking. Shapes: `b` batch, `s` query length, `t` key
length, `h` heads, `d` head width, `w` model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.diagnostics import user_error

#: torch dtypes for the spec's `dtype` values.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Standard deviation of the normal initialisation, as in Hugging Face's `initializer_range`.
INIT_STD = 0.02


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function for a spec value; an unknown name is a user error, not a KeyError."""
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise user_error("E0590", f"unknown activation `{name}`", help="one of: " + ", ".join(sorted(ACTIVATIONS)))
    return fn


class Act(nn.Module):
    """An activation as a module, so `nn.Sequential` indices match the Hugging Face layouts (`mlp.0`, `mlp.2`)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = activation(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class RMSNorm(nn.Module):
    """Llama's RMSNorm (`w * x`), or Gemma's (`(1 + w) * x`, weight starting at 0) when `offset` is set.

    Statistics are taken in float32 whatever the parameter dtype, as the reference implementations do.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x if dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * (h if dtype == torch.float32 else h.to(dtype))

    def init_weights(self, std: float) -> None:
        nn.init.zeros_(self.weight) if self.offset else nn.init.ones_(self.weight)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` channels of each head; the rest pass through (partial rotary).

    x: [b x h x s x d], cos / sin_signed: [b x 1 x s x r] with r <= d. `sin_signed` carries the sign of
    `rotate_half`, so `roll(x) * sin_signed == rotate_half(x) * sin` exactly, in one op instead of three.
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + x.roll(r // 2, dims=-1) * sin_signed
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rot.roll(r // 2, dims=-1) * sin_signed, rest), dim=-1)


def inv_frequencies(dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """1 / theta^(2i / dim) for i < dim / 2: the rotary frequencies of Hugging Face's default rope."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def llama3_frequencies(inv: Tensor, factor: float, low: float, high: float, original: int) -> Tensor:
    """Llama 3.1's scaling of rotary frequencies: wavelengths shorter than original / high are kept,
    longer than original / low divided by `factor`, and the band between blends the two smoothly."""
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, blended, scaled)


@dataclass(slots=True)
class Rotary:
    """cos / sign-folded sin tables for one forward pass, shaped to broadcast over heads: [b x 1 x s x r].

    Build with `Rotary.of(cos, sin)` from the usual tables (`cat(freqs, freqs)`, cos and sin of it).
    """

    cos: Tensor
    sin_signed: Tensor

    @classmethod
    def of(cls, cos: Tensor, sin: Tensor) -> Rotary:
        half = sin.shape[-1] // 2
        return cls(cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))

    def apply(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rotary(q, self.cos, self.sin_signed), apply_rotary(k, self.cos, self.sin_signed)


def tiles_in_use(in_use: Tensor, aspect: Tensor, tiles: int) -> Tensor:
    """bool [... x tiles]: the tiles each aspect-ratio id (Mllama's numbering) puts to use; `in_use[id]`
    counts them (`ViTBase.tiles_in_use`), the rest of an image's tiles are padding."""
    used = in_use.to(aspect.device)[aspect]
    return torch.arange(tiles, device=aspect.device) < used[..., None]


def tracing() -> bool:
    """Whether this code is being traced (torch.export, torch.compile): checks and shortcuts that read
    tensor values (`bool(mask.all())`) must not run then; the graph takes the general path."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


class CheckpointedBlocks:
    """A mixin for a module that runs a stack of transformer blocks: with `checkpoint_blocks` set (the
    trainer sets it for a stage's `activation_checkpointing`, and clears it after), each block's
    activations are recomputed in the backward pass instead of stored.

    The flag lives on the module, not in global state, so two models (or a model and its export) never
    share it; it acts only while the module trains with gradients on, so evaluation, generation and
    export run exactly as without it."""

    checkpoint_blocks: bool = False
    training: bool

    def run_block(self, block: Callable[..., Tensor], *args: object) -> Tensor:
        """`block(*args)`, under torch's non-reentrant checkpoint when this module checkpoints its blocks.
        Non-reentrant: gradients reach parameters the block only closes over (LoRA adapters, fusion experts
        in a decoder layer), inputs need not require grad, and dropout's RNG state is replayed."""
        if self.checkpoint_blocks and self.training and torch.is_grad_enabled() and not tracing():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped-query support; returns [b x s x (h*d)].

    q: [b x h x s x d]; k, v: [b x hk x t x d] with h a multiple of hk; mask: bool [b x 1 x s x t]
    (True = may attend) or None.
    """
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=gqa)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[b x s x (h*d)] -> [b x h x s x d]."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def mlp_stack(d_in: int, hidden: int | list[int], d_out: int, layers: int, act: str,
              bias: bool = True) -> list[nn.Module]:
    """`layers` linear layers with the activation between them, for connectors' MLP heads; `hidden` is one
    width for every hidden layer or one per hidden layer."""
    widths = list(hidden) if isinstance(hidden, list) else [hidden] * (layers - 1)
    dims = [d_in, *widths, d_out]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        if i:
            mods.append(Act(act))
        mods.append(nn.Linear(a, b, bias=bias))
    return mods


class NumberedLinears(nn.Module):
    """A base for MLP heads laid out as LLaVA's projector: `linear_1`, act, `linear_2`, ... directly on the
    module, so checkpoints load by key (`multi_modal_projector.linear_1.weight`)."""

    def add_linears(self, d_in: int, hidden: int | list[int], d_out: int, layers: int, act: str) -> None:
        self.n_linear = layers
        self.act_fn = activation(act)
        linears = [m for m in mlp_stack(d_in, hidden, d_out, layers, act) if isinstance(m, nn.Linear)]
        for i, mod in enumerate(linears):
            self.add_module(f"linear_{i + 1}", mod)

    def run_linears(self, x: Tensor) -> Tensor:
        for i in range(1, self.n_linear + 1):
            x = getattr(self, f"linear_{i}")(x)
            if i < self.n_linear:
                x = self.act_fn(x)
        return x


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a component computes in: that of its first floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def init_weights(model: nn.Module, std: float = INIT_STD) -> None:
    """Hugging-Face-style initialisation: normal(0, std) weights, zero biases, unit norms.

    Modules holding raw parameters (class tokens, queries, gates) define `init_weights(std)`; they are
    called after the generic rules so their own choice (a zero gate, say) wins, the root's own included: a
    component that is itself such a module (a connector's latent queries, the contrastive head's scale)
    would otherwise keep uninitialised memory when it is built on meta and materialised. No seeding here:
    the caller owns the random state.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in model.modules():
            own = getattr(m, "init_weights", None)
            if callable(own):
                own(std)


def check_divisible(width: int, heads: int, what: str) -> None:
    if heads <= 0 or width % heads:
        raise user_error("E0591", f"{what}: width {width} is not divisible by {heads} heads",
                         help="choose heads that divide the width")



@dataclass(slots=True)
class VisualTokens:
    """Image tokens and the patch grid they lie on; pooling connectors need the grid, `None` = no grid.

    x: [n x t x d] for n images.
    """

    x: Tensor
    grid: tuple[int, int] | None

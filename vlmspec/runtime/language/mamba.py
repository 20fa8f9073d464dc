"""`mamba`: Mamba-1 (Hugging Face's `MambaForCausalLM`) in plain PyTorch, driven by the VLM like `CausalLM`.

Keys follow Hugging Face (`backbone.embeddings`, `backbone.layers.N.norm`, `backbone.layers.N.mixer.in_proj`
/ `conv1d` / `x_proj` / `dt_proj` / `A_log` / `D` / `out_proj`, `backbone.norm_f`, `lm_head`), so a
checkpoint loads by key.

The selective scan is a loop over the sequence (the parallel CUDA kernels are not a dependency); the
per-token tensors around it (the discretised A and B x) are computed for the whole pass at once.

Generation state. A Mamba layer keeps no keys and values, only the last `conv - 1` inputs of its
convolution and its SSM state: both go in the shared `KVCache`'s `extras` (per-row tensors that beam
search and the server's batching already reorder, select and concatenate by row), and one empty
[b x 0 x s x 0] self-attention entry counts the tokens seen, so `cache.length()`, the mask-length check
and the server's row bookkeeping read a Mamba's cache as any other. A pass with a cache continues from the
stored states (a prompt prefilled, then one token at a time), which gives what recomputing the whole
sequence gives.

Padding. Positions whose `token_mask` is 0 (left padding) feed zeros into the convolution and the scan,
as Hugging Face masks them, so the state a padded row reaches is the one its unpadded row reaches and
padding never changes a row's result. (Hugging Face masks before `in_proj`; with `bias = true` its
convolution then sees the in_proj bias at padded positions, so only unpadded rows compare equal there.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.mamba import Mamba
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, RMSNorm, tracing
from vlmspec.runtime.decoding import DecodeState, KVCache
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart


@dataclass(frozen=True, slots=True)
class SSMConfig:
    """The resolved numbers of a Mamba, read once from the schema; the fields the VLM reads of any language
    model's `c` (vocab, embed_rows, max_positions, width, depth, mrope) mean what they mean there."""

    width: int
    depth: int
    state: int
    conv: int
    inner: int
    rank: int
    vocab: int
    max_positions: int
    eps: float
    tie: bool
    conv_bias: bool
    bias: bool
    residual_fp32: bool
    mrope: None = None  # positions are 1-D (and unused): a scan reads the order of its inputs

    @property
    def n_vocab(self) -> int:
        return self.vocab

    @property
    def embed_rows(self) -> int:
        return self.vocab

    @classmethod
    def of(cls, cfg: Mamba) -> SSMConfig:
        return cls(width=cfg.width, depth=cfg.depth, state=cfg.state, conv=cfg.conv, inner=cfg.inner, rank=cfg.rank,
                   vocab=cfg.vocab, max_positions=cfg.max_positions, eps=cfg.norm_eps, tie=cfg.tie_embeddings,
                   conv_bias=cfg.conv_bias, bias=cfg.bias, residual_fp32=cfg.residual_fp32)


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, in float32.

    x, dt: [b x s x d]; A: [d x n]; B, C: [b x s x n]; h0: [b x d x n] (None: zeros).
    -> (y [b x s x d], the last state [b x d x n])."""
    decay = torch.exp(dt[..., None] * A)  # [b x s x d x n]
    drive = (dt * x)[..., None] * B[:, :, None, :]  # [b x s x d x n]
    h = h0 if h0 is not None else x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    states = []
    for t in range(x.shape[1]):
        h = decay[:, t] * h + drive[:, t]
        states.append(h)
    y = torch.einsum("bsdn,bsn->bsd", torch.stack(states, dim=1), C)
    return y, h


class MambaMixer(nn.Module):
    """in_proj -> (x, z); causal depthwise conv1d + silu on x; x_proj -> (dt, B, C); dt_proj + softplus;
    selective scan with A = -exp(A_log) and the skip D; gated by silu(z); out_proj."""

    def __init__(self, c: SSMConfig):
        super().__init__()
        self.c = c
        d = c.inner
        self.in_proj = nn.Linear(c.width, 2 * d, bias=c.bias)
        self.conv1d = nn.Conv1d(d, d, c.conv, groups=d, bias=c.conv_bias)  # run causally in `forward`
        self.x_proj = nn.Linear(d, c.rank + 2 * c.state, bias=False)
        self.dt_proj = nn.Linear(c.rank, d, bias=True)
        # S4D-real: A = -(1, 2, ..., n) per channel; set here so a model never holds uninitialised values
        self.A_log = nn.Parameter(torch.log(torch.arange(1, c.state + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, c.width, bias=c.bias)

    def init_weights(self, std: float) -> None:
        """Mamba's own initialisation (after the generic normal / zeros): A and D as above; dt_proj so that
        softplus(bias) is a time step between 0.001 and 0.1, log-uniformly (the paper's choice)."""
        c = self.c
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, c.state + 1, dtype=torch.float32)).repeat(c.inner, 1))
            self.D.fill_(1.0)
            bound = c.rank ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(torch.rand(c.inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, h: Tensor, real: Tensor | None, conv_state: Tensor | None,
                ssm_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """h [b x s x w]; real: bool [b x s] (None: every position); the states a cache holds (None: a fresh
        sequence). -> (output [b x s x w], the conv state [b x d x conv-1], the SSM state [b x d x n])."""
        c = self.c
        b = h.shape[0]
        x, z = self.in_proj(h).chunk(2, dim=-1)
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        x = x.transpose(1, 2)  # [b x d x s]
        past = conv_state if conv_state is not None else x.new_zeros(b, c.inner, c.conv - 1)
        window = torch.cat([past.to(x.dtype), x], dim=-1)  # the inputs before this pass, then its own
        new_conv = window[:, :, window.shape[-1] - (c.conv - 1):]
        x = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=c.inner)).transpose(1, 2)
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        dt, B, C = self.x_proj(x).split([c.rank, c.state, c.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        y, new_ssm = selective_scan(x.float(), dt, A, B.float(), C.float(),
                                    ssm_state.float() if ssm_state is not None else None)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(h.dtype)), new_conv, new_ssm


class MambaLayer(nn.Module):
    """RMSNorm, the mixer, the residual (kept in float32 when `residual_fp32`, as Hugging Face does)."""

    def __init__(self, c: SSMConfig):
        super().__init__()
        self.residual_fp32 = c.residual_fp32
        self.norm = RMSNorm(c.width, c.eps)
        self.mixer = MambaMixer(c)

    def forward(self, h: Tensor, real: Tensor | None, conv_state: Tensor | None,
                ssm_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        residual = h.float() if self.residual_fp32 else h
        out, conv_state, ssm_state = self.mixer(self.norm(h.to(self.norm.weight.dtype)), real, conv_state, ssm_state)
        return residual + out, conv_state, ssm_state


class Backbone(nn.Module):
    """Hugging Face's `backbone`: embeddings, layers, final norm."""


def _keys(i: int) -> tuple[str, str]:
    return f"mamba.conv.{i}", f"mamba.ssm.{i}"


class MambaLM(nn.Module, CheckpointedBlocks):
    """A Mamba language model with `CausalLM`'s interface: embed(ids) -> [b x s x w]; decode(h, state, hooks)
    -> [b x s x w] after the final norm; logits(h) -> [b x s x vocab]; rotary / add_positions do nothing."""

    #: the VLM passes each pass's padding (`DecodeState.token_mask`) to a model that reads it
    reads_token_mask = True
    #: why `vlm export` refuses it (vlmspec.runtime.export.support)
    export_refusal = ("the exported decoder halves carry a static key/value cache; a Mamba carries conv and scan "
                      "states instead, which they have no inputs for yet")

    def __init__(self, c: SSMConfig):
        super().__init__()
        self.c = c
        self.backbone = Backbone()
        self.backbone.embeddings = nn.Embedding(c.vocab, c.width)
        self.backbone.layers = nn.ModuleList([MambaLayer(c) for _ in range(c.depth)])
        self.backbone.norm_f = RMSNorm(c.width, c.eps)
        self.lm_head = nn.Linear(c.width, c.vocab, bias=False)
        if c.tie:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [b x s x w]; the vocabulary check is skipped under tracing, as `CausalLM`'s."""
        if ids.numel() and ids.device.type != "meta" and not tracing() and int(ids.max()) >= self.c.vocab:
            raise user_error("E0596", f"token id {int(ids.max())} is outside the vocabulary of {self.c.vocab}")
        return self.backbone.embeddings(ids)

    def rotary(self, pos: Tensor, dtype: torch.dtype) -> None:
        return None

    def add_positions(self, h: Tensor, pos: Tensor) -> Tensor:
        return h

    def moe_pairs(self) -> list:
        return []

    def decode(self, h: Tensor, state: DecodeState, hooks: list | None = None) -> Tensor:
        """The layers over h [b x s x w], continuing from (and updating) the states in `state.cache`."""
        if hooks is not None:
            raise user_error("E0599", "a fusion reaches inside the layers of a `mamba` language model, which has no "
                             "attention or FFN to extend", help="use `fusion prefix(...)` (`vlm check` says so)")
        cache = state.cache
        real = state.token_mask
        if real is not None and bool(real.all()):
            real = None
        for i, layer in enumerate(self.layers):
            conv_key, ssm_key = _keys(i)
            conv = cache.extras.get(conv_key) if cache is not None else None
            ssm = cache.extras.get(ssm_key) if cache is not None else None
            h, conv, ssm = self.run_block(layer, h, real, conv, ssm)
            if cache is not None:
                cache.extras[conv_key], cache.extras[ssm_key] = conv, ssm
        if cache is not None:
            _count(cache, h)
        return self.backbone.norm_f(h)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    # --- what each spec path (`llm.mixer`, ...) covers; see vlmspec.runtime.spec_paths
    def spec_parts(self) -> list[SpecPart]:
        b = self.backbone
        return [SpecPart("embed", [b.embeddings], GROUP), SpecPart("layers", [b.layers], GROUP),
                SpecPart("mixer", [layer.mixer for layer in self.layers]), SpecPart("norm", [b.norm_f]),
                SpecPart("head", [self.lm_head])]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        return {f"mixer.{n}": [getattr(layer.mixer, n) for layer in self.layers]
                for n in ("in_proj", "x_proj", "out_proj")}


def _count(cache: KVCache, h: Tensor) -> None:
    """Record this pass's tokens in the cache's length (an empty self-attention entry: no keys, no values)."""
    empty = h.new_empty(h.shape[0], 0, h.shape[1], 0)
    cache.update(0, empty, empty)


@register("language", "mamba")
def build_mamba(comp: Component, ctx: BuildContext) -> MambaLM:
    cfg = comp.config
    if not isinstance(cfg, Mamba):
        raise TypeError(f"`{comp.name}` is not a mamba model")  # the registry pairs kind and builder
    return MambaLM(SSMConfig.of(cfg))

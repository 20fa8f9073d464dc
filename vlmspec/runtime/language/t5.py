"""`t5`: T5 / Flan-T5 (Hugging Face's `T5ForConditionalGeneration`) in plain PyTorch: an encoder stack and a
decoder stack, driven by `EncoderDecoderVLM` (runtime/encoder_decoder.py).

Keys follow Hugging Face (`shared`, `encoder.block.N.layer.0.SelfAttention.q` / `k` / `v` / `o` /
`relative_attention_bias`, `layer.0.layer_norm`, `layer.1.DenseReluDense.wi_0` / `wi_1` / `wo` (or `wi`),
the decoder's `layer.1.EncDecAttention` and `layer.2` FFN, `encoder.final_layer_norm`, `lm_head`), so a
checkpoint loads by key; the stacks' `embed_tokens` are the shared embedding under a second name, as there.

Attention. Scores are q . k unscaled, plus the stack's relative-position bias (each stack's first layer
owns the table, every layer adds it), plus a large negative number where a key is padding (or, in the
decoder, in the future). Cross-attention adds no position bias.

Generation state. The decoder's self-attention keys and values go in the shared `KVCache` (which grows by
one position a step); each layer's cross-attention keys and values are computed from the encoder output
once, at the first step, and kept in `cache.cross`; the encoder output and its mask are per-row `extras`,
so beam search reorders all of them with the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.t5 import T5
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, RMSNorm, tracing
from vlmspec.runtime.decoding import KVCache
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import GROUP, SpecPart

_ACT = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu}

#: where the encoder's output and mask live in a generation cache (per-row tensors beam search reorders)
ENC, ENC_MASK = "t5_encoder", "t5_encoder_mask"


@dataclass(frozen=True, slots=True)
class T5Config:
    """The resolved numbers of a T5, read once from the schema; the fields the VLM reads of any language
    model's `c` (vocab, n_vocab, embed_rows, max_positions, width, depth, mrope) mean what they mean there."""

    width: int
    depth: int
    decoder_depth: int
    heads: int
    head_dim: int
    ffn: int
    gated: bool
    act: str
    buckets: int
    max_distance: int
    vocab: int
    max_positions: int
    eps: float
    tie: bool
    decoder_start: int
    mrope: None = None  # no rotary positions

    @property
    def n_vocab(self) -> int:
        return self.vocab

    @property
    def embed_rows(self) -> int:
        return self.vocab

    @classmethod
    def of(cls, cfg: T5) -> T5Config:
        return cls(width=cfg.width, depth=cfg.depth, decoder_depth=cfg.n_dec, heads=cfg.heads, head_dim=cfg.head_dim,
                   ffn=cfg.ffn, gated=cfg.gated, act=cfg.act, buckets=cfg.buckets, max_distance=cfg.max_distance,
                   vocab=cfg.vocab, max_positions=cfg.max_positions, eps=cfg.norm_eps, tie=cfg.tie_embeddings,
                   decoder_start=cfg.decoder_start)


def relative_buckets(rel: Tensor, bidirectional: bool, buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, log-spaced up to
    `max_distance`, one bucket past it; the bidirectional encoder gives each direction half the buckets,
    the causal decoder sees no future and uses them all for the past."""
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out = out + (rel > 0).long() * buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = buckets // 2
    # clamp before the log: distance 0 would be -inf, which `torch.where` discards but a cast does not like
    large = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = large.clamp(max=buckets - 1)
    return out + torch.where(dist < exact, dist, large)


class T5Attention(nn.Module):
    """q, k, v, o without biases; the first self-attention of a stack owns `relative_attention_bias`."""

    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        inner = c.heads * c.head_dim
        self.heads = c.heads
        self.q = nn.Linear(c.width, inner, bias=False)
        self.k = nn.Linear(c.width, inner, bias=False)
        self.v = nn.Linear(c.width, inner, bias=False)
        self.o = nn.Linear(inner, c.width, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(c.buckets, c.heads)

    def split(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(self, h: Tensor, bias: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """h [b x s x w]; bias: float [b or 1 x heads or 1 x s x t] added to the scores (positions and masks);
        kv: the keys and values to attend over [b x heads x t x d] (default: h's own)."""
        q = self.split(self.q(h))
        k, v = kv if kv is not None else (self.split(self.k(h)), self.split(self.v(h)))
        # the masks' lowest float32 value would round to -inf in bf16: a fully masked (padding) row would be NaN
        bias = bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class DenseReluDense(nn.Module):
    """T5's FFN: gated (`wi_0` through the activation times `wi_1`, then `wo`) or plain (`wi`, `wo`)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gated = c.gated
        self.act = _ACT[c.act]
        if c.gated:
            self.wi_0 = nn.Linear(c.width, c.ffn, bias=False)
            self.wi_1 = nn.Linear(c.width, c.ffn, bias=False)
        else:
            self.wi = nn.Linear(c.width, c.ffn, bias=False)
        self.wo = nn.Linear(c.ffn, c.width, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        x = self.act(self.wi_0(h)) * self.wi_1(h) if self.gated else self.act(self.wi(h))
        return self.wo(x.to(self.wo.weight.dtype))


class SelfAttentionLayer(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_bias)
        self.layer_norm = RMSNorm(c.width, c.eps)


class CrossAttentionLayer(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(c, False)
        self.layer_norm = RMSNorm(c.width, c.eps)


class FFLayer(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(c)
        self.layer_norm = RMSNorm(c.width, c.eps)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.DenseReluDense(self.layer_norm(h))


class Block(nn.Module):
    """One layer: pre-norm self-attention, (decoder) cross-attention, FFN, each added to the residual."""

    def __init__(self, c: T5Config, first: bool, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.layer = nn.ModuleList([SelfAttentionLayer(c, first), *([CrossAttentionLayer(c)] if decoder else []),
                                    FFLayer(c)])

    def forward(self, h: Tensor, bias: Tensor, kv: tuple[Tensor, Tensor] | None = None,
                enc: Tensor | None = None, cross: tuple[Tensor, Tensor] | None = None,
                cross_bias: Tensor | None = None) -> Tensor:
        """kv: the self-attention's keys and values (a cache's; default: h's own); enc: the encoder's output
        the decoder reads, or its keys and values already computed in `cross`."""
        sa = self.layer[0]
        h = h + sa.SelfAttention(sa.layer_norm(h), bias, kv)
        if self.decoder:
            ca = self.layer[1].EncDecAttention
            if cross is None:
                cross = (ca.split(ca.k(enc)), ca.split(ca.v(enc)))
            h = h + ca(self.layer[1].layer_norm(h), cross_bias, cross)
        return self.layer[-1](h)


class Stack(nn.Module):
    """An encoder or decoder stack: `embed_tokens` (the shared embedding), `block`, `final_layer_norm`."""

    def __init__(self, c: T5Config, depth: int, decoder: bool, shared: nn.Embedding):
        super().__init__()
        self.embed_tokens = shared
        self.block = nn.ModuleList([Block(c, i == 0, decoder) for i in range(depth)])
        self.final_layer_norm = RMSNorm(c.width, c.eps)

    def position_bias(self, c: T5Config, queries: int, keys: int, past: int, device: torch.device) -> Tensor:
        """[1 x heads x queries x keys]: the first layer's table at each (key - query) distance."""
        q = torch.arange(queries, device=device)[:, None] + past
        k = torch.arange(keys, device=device)[None, :]
        buckets = relative_buckets(k - q, not self.block[0].decoder, c.buckets, c.max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None].float()


def padding_bias(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """[b x 1 x 1 x t] additive bias: 0 at real keys, the dtype's lowest value at padding (None: no padding)."""
    if mask is None:
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)


class T5LM(nn.Module, CheckpointedBlocks):
    """A T5 encoder-decoder, driven by `EncoderDecoderVLM`:

    embed(ids) -> [b x s x w] (image features are spliced in after this); encode(h, mask) -> the encoder's
    output [b x s x w]; decode(ids, enc, enc_mask, cache) -> the decoder's output [b x t x w]; logits(h)."""

    #: the VLM that drives it (`build_model` reads this): an encoder, then a decoder
    encoder_decoder = True
    serve_refusal = ("an encoder-decoder (t5) language model is not served: the engine batches decoder-only rows "
                     "in one self-attention cache, and a t5 row also holds its encoder's output")
    export_refusal = ("an encoder-decoder (t5) model runs an encoder, then a decoder with cross-attention; the "
                      "exported halves hold one decoder-only pass")

    def __init__(self, c: T5Config):
        super().__init__()
        self.c = c
        self.shared = nn.Embedding(c.vocab, c.width)
        self.encoder = Stack(c, c.depth, False, self.shared)
        self.decoder = Stack(c, c.decoder_depth, True, self.shared)
        self.lm_head = nn.Linear(c.width, c.vocab, bias=False)
        if c.tie:
            self.lm_head.weight = self.shared.weight

    # --- what shared code reads of any language model
    @property
    def layers(self) -> nn.ModuleList:
        """The decoder's layers (what a fusion reaching into layers would extend; none may, see E0255)."""
        return self.decoder.block

    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def moe_pairs(self) -> list:
        return []

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [b x s x w]; the vocabulary check is skipped under tracing, as `CausalLM`'s."""
        if ids.numel() and ids.device.type != "meta" and not tracing() and int(ids.max()) >= self.c.vocab:
            raise user_error("E0596", f"token id {int(ids.max())} is outside the vocabulary of {self.c.vocab}")
        return self.shared(ids)

    # --- the two stacks
    def encode(self, h: Tensor, mask: Tensor | None) -> Tensor:
        """The encoder over embeddings h [b x s x w] (image features spliced in), mask [b x s] 1 = real."""
        s = h.shape[1]
        bias = self.encoder.position_bias(self.c, s, s, 0, h.device)
        pad = padding_bias(mask)
        if pad is not None:
            bias = bias + pad
        for block in self.encoder.block:
            h = self.run_block(block, h, bias)
        return self.encoder.final_layer_norm(h)

    def decode(self, ids: Tensor, enc: Tensor, enc_mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """The decoder over ids [b x t] (the new ones when a cache is given), reading the encoder's output
        enc [b x s x w] (its padding masked by enc_mask [b x s]); -> [b x t x w] after the final norm."""
        c = self.c
        h = self.embed(ids)
        t = ids.shape[1]
        past = cache.length() if cache is not None else 0
        bias = self.decoder.position_bias(c, t, past + t, past, h.device)
        future = torch.ones(t, past + t, dtype=torch.bool, device=h.device).triu(past + 1)
        bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        cross_bias = padding_bias(enc_mask)
        if cross_bias is None:
            cross_bias = enc.new_zeros(1, 1, 1, enc.shape[1], dtype=torch.float32)
        for i, block in enumerate(self.decoder.block):
            kv = cross = None
            if cache is not None:
                sa = block.layer[0].SelfAttention
                normed = block.layer[0].layer_norm(h)  # the layer's input, once more for its keys and values
                kv = cache.update(i, sa.split(sa.k(normed)), sa.split(sa.v(normed)))
                cross = self._cross(cache, i, block, enc)
            h = self.run_block(block, h, bias, kv, enc, cross, cross_bias)
        return self.decoder.final_layer_norm(h)

    @staticmethod
    def _cross(cache: KVCache, i: int, block: Block, enc: Tensor) -> tuple[Tensor, Tensor]:
        """Layer i's cross-attention keys and values of the encoder output: computed at the first step, kept."""
        key = f"t5.{i}"
        if key not in cache.cross:
            ca = block.layer[1].EncDecAttention
            cache.cross[key] = (ca.split(ca.k(enc)), ca.split(ca.v(enc)))
        return cache.cross[key]

    def logits(self, h: Tensor) -> Tensor:
        """The head over the decoder's output; a tied head reads it scaled by width ** -0.5 (T5 v1.0)."""
        if self.c.tie:
            h = h * (self.c.width ** -0.5)
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    # --- what each spec path (`llm.encoder`, `llm.attn`, ...) covers; see vlmspec.runtime.spec_paths
    def spec_parts(self) -> list[SpecPart]:
        enc, dec = self.encoder, self.decoder
        attn = [b.layer[0].SelfAttention for b in enc.block] + \
            [m for b in dec.block for m in (b.layer[0].SelfAttention, b.layer[1].EncDecAttention)]
        mlp = [b.layer[-1].DenseReluDense for s in (enc, dec) for b in s.block]
        # the embedding by its parameter: the module is reached under three names (`shared`, both stacks'
        # `embed_tokens`), the parameter under its first
        return [SpecPart("embed", [self.shared.weight], GROUP),
                SpecPart("encoder", [enc.block, enc.final_layer_norm], GROUP),
                SpecPart("decoder", [dec.block, dec.final_layer_norm], GROUP),
                SpecPart("attn", attn), SpecPart("mlp", mlp),
                SpecPart("norm", [enc.final_layer_norm, dec.final_layer_norm]), SpecPart("head", [self.lm_head])]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        ffn = ["wi_0", "wi_1", "wo"] if self.c.gated else ["wi", "wo"]
        for stack, name in ((self.encoder, "encoder"), (self.decoder, "decoder")):
            for b in stack.block:
                attns = [("attn", b.layer[0].SelfAttention)] + ([("cross", b.layer[1].EncDecAttention)]
                                                                 if b.decoder else [])
                for kind, a in attns:
                    for p in "qkvo":
                        out.setdefault(f"{name}.{kind}.{p}", []).append(getattr(a, p))
                for p in ffn:
                    out.setdefault(f"{name}.mlp.{p}", []).append(getattr(b.layer[-1].DenseReluDense, p))
        return out


@register("language", "t5")
def build_t5(comp: Component, ctx: BuildContext) -> T5LM:
    cfg = comp.config
    if not isinstance(cfg, T5):
        raise TypeError(f"`{comp.name}` is not a t5 model")  # the registry pairs kind and builder
    return T5LM(T5Config.of(cfg))

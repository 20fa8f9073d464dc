"""`CausalLM`: the decoder-only language model every family builds, driven step by step by the VLM.

Keys follow Hugging Face (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`,
`model.norm`, `lm_head`; OPT `model.decoder.*`; Phi `self_attn.dense`, `model.final_layernorm`), so a
checkpoint of the language model loads by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.language import MoE
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import CheckpointedBlocks, Rotary, inv_frequencies, llama3_frequencies, tracing
from vlmspec.runtime.decoding import DecodeState
from vlmspec.runtime.language.config import Family, LMConfig, lm_config
from vlmspec.runtime.language.layers import LayerHooks, Parts, make_mlp, norm
from vlmspec.runtime.language.moe import SparseMoE
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import EXPERTS, GROUP, SpecPart


class DecoupledEmbedding(nn.Embedding):
    """IDEFICS' decoupled embedding: rows >= vocab come from `additional_embedding` (trainable apart)."""

    def __init__(self, vocab: int, extra: int, dim: int):
        super().__init__(vocab, dim)
        self.additional_embedding = nn.Embedding(extra, dim)

    def forward(self, ids: Tensor) -> Tensor:
        extra = ids >= self.num_embeddings
        base = F.embedding(ids.masked_fill(extra, 0), self.weight)
        add = self.additional_embedding((ids - self.num_embeddings).clamp(min=0))
        return torch.where(extra[..., None], add, base)


class DecoupledLinear(nn.Linear):
    """IDEFICS' decoupled head: logits for the extra rows come from `additional_fc`, appended."""

    def __init__(self, dim: int, vocab: int, extra: int, bias: bool, extra_bias: bool):
        super().__init__(dim, vocab, bias=bias)
        self.additional_fc = nn.Linear(dim, extra, bias=extra_bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([super().forward(x), self.additional_fc(x)], dim=-1)


def embedding(vocab: int, extra: int, dim: int) -> nn.Embedding:
    return DecoupledEmbedding(vocab, extra, dim) if extra else nn.Embedding(vocab, dim)


def head(dim: int, vocab: int, extra: int, bias: bool, extra_bias: bool) -> nn.Linear:
    """The output head; Phi's extra rows keep a bias even when the main rows are tied (and bias-free)."""
    return DecoupledLinear(dim, vocab, extra, bias, extra_bias) if extra else nn.Linear(dim, vocab, bias=bias)


class RotaryEmbedding(nn.Module):
    """cos / sin for position ids [b x s], or M-RoPE's [3 x b x s] (time, height, width sections)."""

    def __init__(self, dim: int, theta: float, mrope: tuple[int, ...] | None,
                 llama3: tuple[float, float, float, int] | None = None):
        super().__init__()
        self.mrope = mrope
        inv = inv_frequencies(dim, theta)
        if llama3 is not None:
            inv = llama3_frequencies(inv, *llama3)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, pos: Tensor, dtype: torch.dtype) -> Rotary:
        inv = self.inv_freq.float()
        if pos.dim() == 2 and self.mrope is None:
            freqs = pos.float()[..., None] * inv  # [b x s x r/2]
            emb = torch.cat([freqs, freqs], dim=-1)
            return Rotary.of(emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None])
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        freqs = pos.float()[..., None] * inv  # [3 x b x s x r/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        sections = list(self.mrope or ()) * 2
        cos = torch.cat([c[i % 3] for i, c in enumerate(emb.cos().split(sections, dim=-1))], dim=-1)
        sin = torch.cat([c[i % 3] for i, c in enumerate(emb.sin().split(sections, dim=-1))], dim=-1)
        return Rotary.of(cos.to(dtype)[:, None], sin.to(dtype)[:, None])


class OPTPositions(nn.Embedding):
    """OPT's learned positions: row `position + 2` (the first two rows are a historical offset)."""

    offset = 2

    def __init__(self, positions: int, dim: int):
        super().__init__(positions + self.offset, dim)

    def forward(self, pos: Tensor) -> Tensor:
        return super().forward(pos + self.offset)


class Body(nn.Module):
    """Hugging Face's `model` (or OPT's `model.decoder`): embeddings, layers, final norm."""


class CausalLM(nn.Module, CheckpointedBlocks):
    """A decoder-only language model, driven step by step by `VisionLanguageModel`.

    embed(ids) -> [b x s x w] (already scaled / projected: image features are spliced in after this);
    decode(h, state, hooks) -> [b x s x w] after the final norm; logits(h) -> [b x s x vocab + extra].
    """

    def __init__(self, c: LMConfig, family: Family, moe: MoE | None):
        super().__init__()
        self.c = c
        self.family = family
        self.model = Body()
        body = self.model
        if c.learned_positions:
            body.decoder = Body()
            body = body.decoder
        self.body = [body]  # a plain list: the body is registered once, under its Hugging Face name
        e = c.embed_dim or c.width
        body.embed_tokens = embedding(c.vocab + c.embed_extra, c.extra_vocab, e)
        if c.learned_positions:
            body.embed_positions = OPTPositions(c.max_positions, c.width)
            if e != c.width:
                body.project_out = nn.Linear(c.width, e, bias=False)
                body.project_in = nn.Linear(e, c.width, bias=False)
        moe_ids = set(moe.layer_ids(c.depth)) if moe is not None else set()
        body.layers = nn.ModuleList([self._layer(i, moe if i in moe_ids else None) for i in range(c.depth)])
        body.add_module(c.final_norm, norm(c))
        self.norm_name = c.final_norm
        if c.rotary_dim:
            body.rotary_emb = RotaryEmbedding(c.rotary_dim, c.theta, c.mrope, c.llama3)
        self.lm_head = head(e, c.vocab, c.extra_vocab, bias=c.head_bias and not c.tie, extra_bias=c.head_bias)
        if c.tie:
            self.lm_head.weight = body.embed_tokens.weight

    def _layer(self, i: int, moe: MoE | None) -> nn.Module:
        c = self.c
        cls = self.family.layer
        if moe is None:
            return cls(c)
        expert_ffn = moe.ffn or c.ffn
        dense0 = expert_ffn == c.ffn
        block = self.make_moe(moe.experts, moe.top_k, moe.shared, moe.aux_loss, expert_ffn, dense0)
        return cls(c, block, with_ffn=dense0)

    def make_moe(self, experts: int, top_k: int, shared: int, aux: float, ffn: int, dense0: bool) -> SparseMoE:
        c = self.c
        return SparseMoE(c.width, experts, top_k, shared, aux, lambda: self.make_ffn(ffn), self.make_ffn,
                         dense_is_expert0=dense0)

    # --- factories fusions use, so their blocks match this family's shapes and keys
    def make_ffn(self, ffn: int | None = None) -> nn.Module:
        return make_mlp(self.c, ffn)

    def make_norm(self) -> nn.Module:
        return norm(self.c)

    def make_parts(self) -> Parts:
        return self.family.parts(self.c)  # type: ignore[return-value]

    @property
    def layers(self) -> nn.ModuleList:
        return self.body[0].layers

    def dtype(self) -> torch.dtype:
        return self.body[0].embed_tokens.weight.dtype

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [b x s x w]. The vocabulary check reads a tensor value, which a traced graph
        cannot; under tracing it is skipped (the export runner checks the ids before the call)."""
        b = self.body[0]
        rows = self.c.embed_rows
        if ids.numel() and ids.device.type != "meta" and not tracing() and int(ids.max()) >= rows:
            raise user_error("E0596", f"token id {int(ids.max())} is outside the vocabulary of {rows}")
        h = b.embed_tokens(ids)
        if self.c.embed_scale:
            h = h * torch.tensor(self.c.width**0.5, dtype=h.dtype)
        if hasattr(b, "project_in"):
            h = b.project_in(h)
        return h

    def rotary(self, pos: Tensor, dtype: torch.dtype) -> Rotary | None:
        b = self.body[0]
        return b.rotary_emb(pos, dtype) if self.c.rotary_dim else None

    def add_positions(self, h: Tensor, pos: Tensor) -> Tensor:
        """Absolute learned positions (OPT); rotary families do this inside attention."""
        if not self.c.learned_positions:
            return h
        p = pos if pos.dim() == 2 else pos[0]
        return h + self.body[0].embed_positions(p).to(h.dtype)

    def decode(self, h: Tensor, state: DecodeState, hooks: list[LayerHooks | None] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            hk = hooks[i] if hooks is not None else None
            if hk is not None:
                for block in hk.before:
                    h = block(h, state)
            h = self.run_block(layer, h, state, i, hk)
        return getattr(self.body[0], self.norm_name)(h)

    def logits(self, h: Tensor) -> Tensor:
        b = self.body[0]
        if hasattr(b, "project_out"):
            h = b.project_out(h)
        return self.lm_head(h)

    def moe_pairs(self) -> list[tuple[SparseMoE, nn.Module]]:
        """(MoE block, its layer) for every layer of this model's own `moe` block."""
        return [(layer.moe, layer) for layer in self.layers if getattr(layer, "moe", None) is not None]

    # --- what each spec path (`llm.attn`, `llm.moe`, ...) covers; see vlmspec.runtime.spec_paths
    def spec_parts(self) -> list[SpecPart]:
        b = self.body[0]
        layers = list(self.layers)
        embed = [b.embed_tokens, *(getattr(b, n, None) for n in ("embed_positions", "project_in", "project_out"))]
        # an up-cycled layer's dense FFN is its expert 0, so `moe` covers it too
        experts = [m for block, layer in self.moe_pairs()
                   for m in [block, *(layer.ffn_modules() if block.dense_is_expert0 else [])]]
        return [SpecPart("embed", embed, GROUP), SpecPart("layers", [b.layers], GROUP),
                SpecPart("attn", [layer.self_attn for layer in layers]),
                SpecPart("mlp", [m for layer in layers for m in layer.ffn_modules()]),
                SpecPart("norm", [getattr(b, self.norm_name)]), SpecPart("head", [self.lm_head]),
                SpecPart("moe", experts, EXPERTS)]

    def lora_parts(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        for layer in self.layers:
            for target, linear in layer.lora_linears().items():
                out.setdefault(target, []).append(linear)
        return out


def register_family(family: Family) -> Family:
    """Register the builder of one language family: the shared decoder, configured by `family`."""

    def build(comp: Component, ctx: BuildContext) -> CausalLM:
        cfg = comp.config
        if not isinstance(cfg, family.schema):
            raise user_error("E0592", f"`{comp.name}` is not a {family.name} model")
        return CausalLM(lm_config(cfg, family), family, cfg.moe)

    build.__name__ = f"build_{family.name}"
    register("language", family.name)(build)
    return family

"""Language models: `llama` (also Vicuna, Mistral, Qwen2 by fields), `gemma`, `opt` and `phi`, with an
optional routed-expert (`moe`) block.

Each family is a decoder layer class whose attention and FFN live in a "parts" class; a visual
expert (CogVLM) is another instance of the same parts class, so it has exactly the layer's shapes
and keys. Layers expose three hook points, `qkv`, `attn_out` and `ffn`, which fusions route per
token (`LayerHooks`): the language model's code and weights stay unchanged, as in torchtune's
fusion wrappers. Keys follow Hugging Face (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, `model.norm`, `lm_head`; OPT `model.decoder.*`; Phi `self_attn.dense`,
`model.final_layernorm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmspec.compiler.ir import Component
from vlmspec.compiler.schema.language import OPT, Gemma, LanguageBase, Llama, Llama3RoPE, MoE, MRoPE, Phi
from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import (
    RMSNorm,
    Rotary,
    activation,
    attend,
    inv_frequencies,
    llama3_frequencies,
    split_heads,
    tracing,
)
from vlmspec.runtime.decoding import DecodeState
from vlmspec.runtime.moe import SparseMoE
from vlmspec.runtime.registry import BuildContext, register
from vlmspec.runtime.spec_paths import EXPERTS, GROUP, SpecPart


@dataclass(frozen=True, slots=True)
class LMConfig:
    """The resolved numbers a family needs, read once from the schema."""

    family: str
    width: int
    depth: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    extra_vocab: int
    max_positions: int
    eps: float
    theta: float
    act: str
    tie: bool
    qkv_bias: bool = False
    rotary_dim: int = 0  # 0: no rotary (OPT)
    mrope: tuple[int, ...] | None = None
    embed_dim: int | None = None  # OPT word-embedding width
    embed_extra: int = 0  # embedding rows past the vocabulary that the head lacks (Mllama)
    llama3: tuple[float, float, float, int] | None = None  # (factor, low, high, original positions)

    @property
    def n_vocab(self) -> int:
        """Rows of the output head (the logits' width)."""
        return self.vocab + self.extra_vocab

    @property
    def embed_rows(self) -> int:
        """Rows of the input embedding: the head's, plus `embed_extra` ones it never predicts."""
        return self.n_vocab + self.embed_extra


def lm_config(cfg: LanguageBase, family: str) -> LMConfig:
    hd = cfg.hd
    rotary = 0 if family == "opt" else hd
    if isinstance(cfg, Phi):
        rotary = int(cfg.partial_rotary * hd)
    if family == "opt" and (cfg.n_kv != cfg.heads or cfg.hd * cfg.heads != cfg.width):
        raise user_error("E0509", "an `opt` language model has width = heads x head_dim and no grouped-query "
                         "attention", help="drop `kv_heads` / `head_dim`, or use `llama`")
    if cfg.embed_extra and (cfg.extra_vocab or cfg.tie_embeddings):
        raise user_error("E0509", "`embed_extra` rows cannot be combined with `extra_vocab` or `tie_embeddings` "
                         "(the head would need rows the embedding has, or the reverse)",
                         help="drop `embed_extra`, or untie the head and drop `extra_vocab`")
    return LMConfig(
        family=family, width=cfg.width, depth=cfg.depth, heads=cfg.heads, kv_heads=cfg.n_kv, head_dim=hd,
        ffn=cfg.ffn, vocab=cfg.vocab, extra_vocab=cfg.extra_vocab, max_positions=cfg.max_positions,
        eps=cfg.norm_eps, theta=cfg.rope_theta, act=getattr(cfg, "act", "silu"), tie=cfg.tie_embeddings,
        qkv_bias=getattr(cfg, "qkv_bias", False), rotary_dim=rotary,
        mrope=tuple(cfg.rope.sections) if isinstance(cfg.rope, MRoPE) else None,
        embed_dim=getattr(cfg, "embed_dim", None), embed_extra=cfg.embed_extra,
        llama3=(r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_positions)
        if isinstance(r := cfg.rope, Llama3RoPE) else None)


# ---------------------------------------------------------------- parts: attention projections and FFNs


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


class LlamaParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, c.qkv_bias, False, "o_proj")
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = GatedMLP(c.width, c.ffn, c.act)


class PhiParts(Parts):
    def __init__(self, c: LMConfig, with_ffn: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(c, True, True, "dense")
        self.has_ffn = with_ffn
        if with_ffn:
            self.mlp = PlainMLP(c.width, c.ffn, c.act)


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


# ---------------------------------------------------------------- fusion hook points


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


# ---------------------------------------------------------------- decoder layers


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

    def run_ffn(self, x: Tensor, state: DecodeState, hooks: LayerHooks | None) -> Tensor:
        moe = hooks.moe if hooks is not None and hooks.moe is not None else self.moe
        if moe is not None:
            y, aux = moe(x, self.ffn if self.has_ffn else None, state.token_mask)
            state.aux.append(aux)
            return y
        expert = hooks.expert if hooks is not None else None
        return route(self.ffn, expert.ffn if expert else None, x, state.image_mask)


def _norm(c: LMConfig, gemma: bool = False) -> nn.Module:
    if c.family in ("opt", "phi"):
        return nn.LayerNorm(c.width, eps=c.eps)
    return RMSNorm(c.width, c.eps, offset=gemma)


class LlamaLayer(DecoderLayer, LlamaParts):
    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        gemma = c.family == "gemma"
        self.input_layernorm = _norm(c, gemma)
        self.post_attention_layernorm = _norm(c, gemma)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.input_layernorm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.post_attention_layernorm(h)


class OPTLayer(DecoderLayer, OPTParts):
    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.self_attn_layer_norm = _norm(c)
        self.final_layer_norm = _norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.self_attn_layer_norm(h)

    def mlp_norm(self, h: Tensor) -> Tensor:
        return self.final_layer_norm(h)


class PhiLayer(DecoderLayer, PhiParts):
    parallel = True

    def __init__(self, c: LMConfig, moe: SparseMoE | None = None, with_ffn: bool = True):
        super().__init__(c, with_ffn)
        self.c = c
        self.input_layernorm = _norm(c)
        self.moe = moe

    def attn_norm(self, h: Tensor) -> Tensor:
        return self.input_layernorm(h)


LAYERS: dict[str, type[nn.Module]] = {"llama": LlamaLayer, "gemma": LlamaLayer, "opt": OPTLayer, "phi": PhiLayer}
PARTS: dict[str, type[Parts]] = {"llama": LlamaParts, "gemma": LlamaParts, "opt": OPTParts, "phi": PhiParts}


# ---------------------------------------------------------------- embeddings, head, positions


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


# ---------------------------------------------------------------- the language model


class Body(nn.Module):
    """Hugging Face's `model` (or OPT's `model.decoder`): embeddings, layers, final norm."""


class CausalLM(nn.Module):
    """A decoder-only language model, driven step by step by `VisionLanguageModel`.

    embed(ids) -> [b x s x w] (already scaled / projected: image features are spliced in after this);
    decode(h, state, hooks) -> [b x s x w] after the final norm; logits(h) -> [b x s x vocab + extra].
    """

    def __init__(self, c: LMConfig, moe: MoE | None):
        super().__init__()
        self.c = c
        self.model = Body()
        body = self.model
        if c.family == "opt":
            body.decoder = Body()
            body = body.decoder
        self.body = [body]  # a plain list: the body is registered once, under its Hugging Face name
        e = c.embed_dim or c.width
        body.embed_tokens = embedding(c.vocab + c.embed_extra, c.extra_vocab, e)
        if c.family == "opt":
            body.embed_positions = OPTPositions(c.max_positions, c.width)
            if e != c.width:
                body.project_out = nn.Linear(c.width, e, bias=False)
                body.project_in = nn.Linear(e, c.width, bias=False)
        moe_ids = set(moe.layer_ids(c.depth)) if moe is not None else set()
        body.layers = nn.ModuleList([self._layer(i, moe if i in moe_ids else None) for i in range(c.depth)])
        norm_name = {"opt": "final_layer_norm", "phi": "final_layernorm"}.get(c.family, "norm")
        body.add_module(norm_name, _norm(c, c.family == "gemma"))
        self.norm_name = norm_name
        if c.rotary_dim:
            body.rotary_emb = RotaryEmbedding(c.rotary_dim, c.theta, c.mrope, c.llama3)
        phi = c.family == "phi"
        self.lm_head = head(e, c.vocab, c.extra_vocab, bias=phi and not c.tie, extra_bias=phi)
        if c.tie:
            self.lm_head.weight = body.embed_tokens.weight

    def _layer(self, i: int, moe: MoE | None) -> nn.Module:
        c = self.c
        cls = LAYERS[c.family]
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
        c = self.c
        f = ffn or c.ffn
        return GatedMLP(c.width, f, c.act) if c.family in ("llama", "gemma") else PlainMLP(c.width, f, c.act)

    def make_norm(self) -> nn.Module:
        return _norm(self.c, self.c.family == "gemma")

    def make_parts(self) -> Parts:
        return PARTS[self.c.family](self.c)

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
        if self.c.family == "gemma":
            h = h * torch.tensor(self.c.width**0.5, dtype=h.dtype)
        if self.c.family == "opt" and hasattr(b, "project_in"):
            h = b.project_in(h)
        return h

    def rotary(self, pos: Tensor, dtype: torch.dtype) -> Rotary | None:
        b = self.body[0]
        return b.rotary_emb(pos, dtype) if self.c.rotary_dim else None

    def add_positions(self, h: Tensor, pos: Tensor) -> Tensor:
        """Absolute learned positions (OPT); rotary families do this inside attention."""
        if self.c.family != "opt":
            return h
        p = pos if pos.dim() == 2 else pos[0]
        return h + self.body[0].embed_positions(p).to(h.dtype)

    def decode(self, h: Tensor, state: DecodeState, hooks: list[LayerHooks | None] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            hk = hooks[i] if hooks is not None else None
            if hk is not None:
                for block in hk.before:
                    h = block(h, state)
            h = layer(h, state, i, hk)
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


def _build(comp: Component, family: str) -> CausalLM:
    cfg = comp.config
    if not isinstance(cfg, LanguageBase):
        raise user_error("E0592", f"`{comp.name}` is not a language model")
    return CausalLM(lm_config(cfg, family), cfg.moe)


def _family_builder(family: str, schema: type[LanguageBase]):
    """The registered builder of one language family: the same decoder, configured by `lm_config`."""

    def build(comp: Component, ctx: BuildContext) -> CausalLM:
        if not isinstance(comp.config, schema):
            raise user_error("E0592", f"`{comp.name}` is not a {family} model")
        return _build(comp, family)

    build.__name__ = f"build_{family}"
    return build


for _family, _schema in (("llama", Llama), ("gemma", Gemma), ("opt", OPT), ("phi", Phi)):
    register("language", _family)(_family_builder(_family, _schema))

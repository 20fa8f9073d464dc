"""A language model's resolved numbers (`LMConfig`) and what each family contributes (`Family`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmspec.compiler.schema.language import LanguageBase, Llama3RoPE, MRoPE, Phi
from vlmspec.diagnostics import user_error


@dataclass(frozen=True, slots=True)
class Family:
    """One language-model family: its decoder layer and parts classes, and how its layout differs from
    Llama's. A family's file declares one and registers it (`register_family`); the shared decoder
    (`CausalLM`) is configured by it, so no code switches on a family's name."""

    name: str
    schema: type[LanguageBase]
    layer: type[nn.Module]  # a `DecoderLayer` on the family's `Parts`
    parts: type[nn.Module]  # the attention projections and FFN alone (what a visual expert copies)
    gated_mlp: bool = True
    layer_norm: bool = False
    norm_offset: bool = False
    embed_scale: bool = False
    learned_positions: bool = False
    head_bias: bool = False
    final_norm: str = "norm"


@dataclass(frozen=True, slots=True)
class LMConfig:
    """The resolved numbers a family needs, read once from the schema."""

    family: str  # the family's name, for messages
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
    # how the family's layout differs from Llama's (read from its `Family`)
    gated_mlp: bool = True  # SwiGLU / GeGLU (`gate_proj`, `up_proj`, `down_proj`), else `fc1`, `fc2` with biases
    layer_norm: bool = False  # LayerNorm (OPT, Phi), else RMSNorm
    norm_offset: bool = False  # Gemma's RMSNorm scales by 1 + weight
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(width)
    learned_positions: bool = False  # OPT: absolute learned positions (no rotary), `model.decoder.*` keys
    head_bias: bool = False  # Phi's output head has a bias
    final_norm: str = "norm"  # the final norm's key (`model.norm`, OPT `final_layer_norm`, Phi `final_layernorm`)

    @property
    def n_vocab(self) -> int:
        """Rows of the output head (the logits' width)."""
        return self.vocab + self.extra_vocab

    @property
    def embed_rows(self) -> int:
        """Rows of the input embedding: the head's, plus `embed_extra` ones it never predicts."""
        return self.n_vocab + self.embed_extra


def lm_config(cfg: LanguageBase, family: Family) -> LMConfig:
    hd = cfg.hd
    rotary = 0 if family.learned_positions else hd
    if isinstance(cfg, Phi):
        rotary = int(cfg.partial_rotary * hd)
    if family.learned_positions and (cfg.n_kv != cfg.heads or cfg.hd * cfg.heads != cfg.width):
        raise user_error("E0509", f"an `{family.name}` language model has width = heads x head_dim and no "
                         "grouped-query attention", help="drop `kv_heads` / `head_dim`, or use `llama`")
    if cfg.embed_extra and (cfg.extra_vocab or cfg.tie_embeddings):
        raise user_error("E0509", "`embed_extra` rows cannot be combined with `extra_vocab` or `tie_embeddings` "
                         "(the head would need rows the embedding has, or the reverse)",
                         help="drop `embed_extra`, or untie the head and drop `extra_vocab`")
    return LMConfig(
        family=family.name, width=cfg.width, depth=cfg.depth, heads=cfg.heads, kv_heads=cfg.n_kv, head_dim=hd,
        ffn=cfg.ffn, vocab=cfg.vocab, extra_vocab=cfg.extra_vocab, max_positions=cfg.max_positions,
        eps=cfg.norm_eps, theta=cfg.rope_theta, act=getattr(cfg, "act", "silu"), tie=cfg.tie_embeddings,
        qkv_bias=getattr(cfg, "qkv_bias", False), rotary_dim=rotary,
        mrope=tuple(cfg.rope.sections) if isinstance(cfg.rope, MRoPE) else None,
        embed_dim=getattr(cfg, "embed_dim", None), embed_extra=cfg.embed_extra,
        llama3=(r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_positions)
        if isinstance(r := cfg.rope, Llama3RoPE) else None,
        gated_mlp=family.gated_mlp, layer_norm=family.layer_norm, norm_offset=family.norm_offset,
        embed_scale=family.embed_scale, learned_positions=family.learned_positions,
        head_bias=family.head_bias and getattr(cfg, "head_bias", True),
        final_norm=family.final_norm)

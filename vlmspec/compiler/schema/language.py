"""Language models: `llama` (Llama, Vicuna, Mistral, Qwen2 by fields), `opt`, `phi`, `gemma`.

All four are decoder-only transformers; they differ in norms, MLP shape, biases and positions. The
parameter formulas mirror the Hugging Face classes exactly, and a test checks that on the meta device.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vlmspec.compiler.schema.base import (
    MAX_HEADS,
    MAX_LAYERS,
    CallValue,
    ComponentSchema,
    Dtype,
    Quantize,
    Schema,
    ShapeContext,
    layernorm,
    linear,
    register,
)


class MoE(Schema):
    """Top-k routed expert FFNs, as in MoE-LLaVA, DeepSeek-VL2 and Mixtral."""

    experts: int = Field(default=4, ge=1, description="expert FFNs per MoE layer")
    top_k: int = Field(default=2, ge=1, description="experts each token is routed to")
    every: int = Field(default=1, ge=1, description="an MoE layer every N decoder layers (layers 0, N, 2N, ...)")
    offset: int = Field(default=0, ge=0, description="first MoE layer index")
    shared: int = Field(default=0, ge=0, description="shared experts every token also goes through")
    aux_loss: float = Field(default=0.01, ge=0, description="weight of the load-balancing loss")
    ffn: int | None = Field(default=None, gt=0, description="expert hidden size (default: the dense FFN's)")

    def layer_ids(self, depth: int) -> list[int]:
        return [i for i in range(depth) if i >= self.offset and (i - self.offset) % self.every == 0]


class MRoPE(Schema):
    """`mrope(sections = [16, 24, 24])`: Qwen2-VL's multimodal rotary embedding (time, height, width)."""

    sections: list[int] = Field(min_length=3, max_length=3, description="rotary dims for time, height, width")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "mrope" or v.args:
                raise ValueError("expected `default` or `mrope(sections = [t, h, w])`")
            return v.kw()
        return v

    def to_vlm(self) -> str:
        return f"mrope(sections = [{', '.join(map(str, self.sections))}])"


class Llama3RoPE(Schema):
    """`llama3(factor = 8, ...)`: Llama 3.1's frequency-dependent RoPE scaling for long contexts."""

    factor: float = Field(default=8.0, gt=0, description="how much longer than the original context")
    low_freq_factor: float = Field(default=1.0, gt=0, description="wavelengths above original / this are scaled")
    high_freq_factor: float = Field(default=4.0, gt=0, description="wavelengths below original / this are kept")
    original_max_positions: int = Field(default=8192, gt=0, description="the context the model was trained at")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "llama3" or v.args:
                raise ValueError("expected `default`, `mrope(sections = [t, h, w])` or `llama3(factor = F, ...)`")
            return v.kw()
        return v

    def to_vlm(self) -> str:
        return (f"llama3(factor = {self.factor}, low_freq_factor = {self.low_freq_factor}, "
                f"high_freq_factor = {self.high_freq_factor}, original_max_positions = {self.original_max_positions})")


class LanguageBase(ComponentSchema):
    role = "language"
    checkpointable = True
    #: every token reads others only through a masked attention, so packed samples stay apart (compiler/packing.py)
    masks_attention: ClassVar[bool] = True
    width: int = Field(default=4096, gt=0, description="hidden size")
    depth: int = Field(default=32, gt=0, le=MAX_LAYERS, description="decoder layers")
    heads: int = Field(default=32, gt=0, le=MAX_HEADS, description="attention heads")
    kv_heads: int | None = Field(default=None, gt=0, description="key/value heads for grouped-query attention (default: heads)")
    head_dim: int | None = Field(default=None, gt=0, description="width of one head (default: width / heads)")
    ffn: int = Field(default=11008, gt=0, description="feed-forward hidden size")
    vocab: int = Field(default=32000, gt=0, description="vocabulary size")
    extra_vocab: int = Field(default=0, ge=0, description="extra trainable token rows (IDEFICS' decoupled embeddings)")
    embed_extra: int = Field(default=0, ge=0, description="input-embedding rows past `vocab` that the output head "
                             "never predicts (Llama 3.2 Vision: 8, its `<|image|>` among them)")
    max_positions: int = Field(default=4096, gt=0, description="longest sequence (prompt + image tokens + answer)")
    rope_theta: float = Field(default=10000.0, gt=0, description="rotary base frequency")
    rope: Literal["default"] | MRoPE | Llama3RoPE = Field(
        default="default", description="`default`, `mrope(sections = [...])` (Qwen2-VL) or `llama3(factor = 8, ...)` "
        "(Llama 3.1+ long-context scaling)")
    norm_eps: float = Field(default=1e-6, gt=0, description="normalisation epsilon")
    tie_embeddings: bool = Field(default=False, description="share the input embedding with the output head")
    moe: MoE | None = Field(default=None, description="turn FFNs into routed experts: `moe { experts = 4  top_k = 2 }`")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this model from")
    tokenizer: str | None = Field(default=None, description="local tokenizer folder (default: the weights folder)")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")
    quantize: Quantize = Field(default="none", description="weight-only quantization at load time")

    @property
    def n_kv(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.heads

    def check(self, ctx: ShapeContext) -> None:
        if self.head_dim is None and self.width % self.heads:
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"),
                           help="set `head_dim` explicitly or choose heads that divide width")
        if self.heads % self.n_kv:
            ctx.sink.error("E0207", f"heads {self.heads} is not divisible by kv_heads {self.n_kv}",
                           ctx.span_of("kv_heads"),
                           help="kv_heads must divide heads: " + ", ".join(
                               str(k) for k in range(1, self.heads + 1) if self.heads % k == 0))
        if isinstance(self.rope, MRoPE) and sum(self.rope.sections) * 2 != self.hd:
            ctx.sink.error("E0209", f"mrope sections sum to {sum(self.rope.sections)} but head_dim / 2 is {self.hd // 2}",
                           ctx.span_of("rope"))
        if self.moe is not None and self.moe.top_k > self.moe.experts:
            ctx.sink.error("E0302", f"moe routes each token to top_k = {self.moe.top_k} of only {self.moe.experts} experts",
                           ctx.span_of("moe"), help=f"top_k must be at most {self.moe.experts}")

    # --- parameter formulas; the family subclasses override the parts that differ
    def attn_params(self) -> int:
        w, q, kv = self.width, self.heads * self.hd, self.n_kv * self.hd
        return linear(w, q, False) + 2 * linear(w, kv, False) + linear(q, w, False)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn
        return 3 * self.width * f

    def norm_params(self) -> int:
        return self.width  # RMSNorm: weight only

    def embed_params(self) -> int:
        return (self.vocab + self.extra_vocab + self.embed_extra) * self.width

    def head_params(self) -> int:
        base = 0 if self.tie_embeddings else self.vocab * self.width
        return base + self.extra_vocab * self.width

    def moe_extra(self, moe: MoE) -> int:
        """Parameters an MoE layer adds over the dense FFN it replaces."""
        expert = self.mlp_params(moe.ffn)
        return moe.experts * expert + moe.shared * self.mlp_params() + self.width * moe.experts - self.mlp_params()

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        layer = self.attn_params() + self.mlp_params() + 2 * self.norm_params()
        p = {"embed": self.embed_params(), "layers": self.depth * layer, "norm": self.norm_params()}
        head = self.head_params()
        if head:
            p["head"] = head
        if self.moe is not None:
            p["moe"] = len(self.moe.layer_ids(self.depth)) * self.moe_extra(self.moe)
        return p

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        if sub == "attn":
            return self.depth * self.attn_params()
        if sub == "mlp":  # MoE layers whose experts differ in size from the dense FFN have none
            moe = self.moe
            without = len(moe.layer_ids(self.depth)) if moe is not None and moe.ffn not in (None, self.ffn) else 0
            return (self.depth - without) * self.mlp_params()
        if sub == "layers":  # a layer's experts live in the layer
            return parts.get("layers", 0) + parts.get("moe", 0)
        if sub == "moe" and self.moe is not None:
            # the experts replace each MoE layer's dense FFN: the extra parameters plus the FFN they replace
            return parts.get("moe", 0) + len(self.moe.layer_ids(self.depth)) * self.mlp_params()
        return super().part_params(sub, parts, llm)

    def subpaths(self) -> list[str]:
        paths = ["embed", "layers", "attn", "mlp", "norm", "head"]
        if self.moe is not None:
            paths.append("moe")
        return paths

    def lora_targets(self) -> list[str]:
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


@register
class Llama(LanguageBase):
    """Llama family: RMSNorm, rotary positions, SwiGLU, optional GQA and QKV bias (Vicuna, Mistral, Qwen2)."""

    kind = "llama"
    summary = "Llama-family decoder (Vicuna, Mistral, Qwen2 via qkv_bias / kv_heads)"
    qkv_bias: bool = Field(default=False, description="bias on the q, k and v projections (Qwen2)")
    act: Literal["silu", "gelu", "gelu_tanh"] = Field(default="silu", description="gated-MLP activation")

    def attn_params(self) -> int:
        extra = (self.heads + 2 * self.n_kv) * self.hd if self.qkv_bias else 0
        return super().attn_params() + extra


@register
class Gemma(LanguageBase):
    """Gemma: like Llama but GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(width), tied head."""

    kind = "gemma"
    summary = "Gemma decoder: GeGLU, scaled embeddings, tied head"
    tie_embeddings: bool = Field(default=True, description="share the input embedding with the output head")
    act: Literal["gelu_tanh", "gelu", "silu"] = Field(default="gelu_tanh", description="gated-MLP activation")


@register
class OPT(LanguageBase):
    """OPT: learned positions (offset 2), LayerNorm, ReLU, biases everywhere, tied head."""

    kind = "opt"
    summary = "OPT decoder: learned positions, LayerNorm, ReLU"
    tie_embeddings: bool = Field(default=True, description="share the input embedding with the output head")
    embed_dim: int | None = Field(default=None, gt=0, description="word-embedding width if it differs from width (OPT-350m)")
    act: Literal["relu", "gelu"] = Field(default="relu", description="MLP activation")
    norm_eps: float = Field(default=1e-5, gt=0, description="normalisation epsilon")
    max_positions: int = Field(default=2048, gt=0, description="longest sequence (prompt + image tokens + answer)")

    @property
    def e(self) -> int:
        return self.embed_dim or self.width

    def attn_params(self) -> int:
        return 4 * linear(self.width, self.width)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn
        return linear(self.width, f) + linear(f, self.width)

    def norm_params(self) -> int:
        return layernorm(self.width)

    def embed_params(self) -> int:
        p = (self.vocab + self.extra_vocab + self.embed_extra) * self.e + (self.max_positions + 2) * self.width
        if self.e != self.width:
            p += 2 * self.e * self.width
        return p

    def head_params(self) -> int:
        return (0 if self.tie_embeddings else self.vocab * self.e) + self.extra_vocab * self.e

    def lora_targets(self) -> list[str]:
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]


@register
class Phi(LanguageBase):
    """Phi-1.5 / Phi-2: one LayerNorm per layer, attention and MLP in parallel, partial rotary, biased head."""

    kind = "phi"
    summary = "Phi-2 decoder: parallel attention and MLP, partial rotary"
    partial_rotary: float = Field(default=0.4, gt=0, le=1, description="fraction of each head that is rotated")
    act: Literal["gelu_tanh", "gelu"] = Field(default="gelu_tanh", description="MLP activation")
    norm_eps: float = Field(default=1e-5, gt=0, description="normalisation epsilon")
    head_bias: bool = Field(default=True, description="a bias on the output head (PhiForCausalLM's; LLaVA's own "
                            "head has none); a tied head has none")

    def attn_params(self) -> int:
        w, q, kv = self.width, self.heads * self.hd, self.n_kv * self.hd
        return linear(w, q) + 2 * linear(w, kv) + linear(q, w)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn
        return linear(self.width, f) + linear(f, self.width)

    def norm_params(self) -> int:
        return layernorm(self.width)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        p = super().params(ctx)
        p["layers"] -= self.depth * self.norm_params()  # a single LayerNorm per layer
        return p

    def head_params(self) -> int:
        bias = (0 if self.tie_embeddings else self.vocab) + self.extra_vocab if self.head_bias else 0
        return super().head_params() + bias

    def lora_targets(self) -> list[str]:
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]

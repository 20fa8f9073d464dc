"""The audio role: a Whisper-style encoder over log-mel features (Whisper, Qwen2-Audio).

An `audio` component reads sound, not pixels: the log-mel front end (`mels`, `sample_rate`, `hop`, `n_fft`,
`seconds`) is part of the kind because the encoder's learned positions are fixed to one clip length, so the
features and the weights must agree. Its tokens go through a connector and a `prefix` fusion, one `<|AUDIO|>`
placeholder per token, as Qwen2AudioProcessor expands them.

    audio enc = whisper { mels = 128  width = 1280  depth = 32  heads = 20  mlp = 5120  pool = 2 }
    connector proj = linear(enc -> llm)
    fusion prefix(proj -> llm) { image_token = "<|AUDIO|>" }
"""

from __future__ import annotations

from pydantic import Field

from vlmspec.compiler.schema.base import (
    MAX_HEADS,
    MAX_LAYERS,
    ComponentSchema,
    Dtype,
    ShapeContext,
    TokenShape,
    layernorm,
    linear,
    register,
)


@register
class Whisper(ComponentSchema):
    """Whisper's encoder: two GELU conv1d layers (the second of stride 2) over log-mel frames, learned
    positions, pre-LN transformer blocks; Qwen2-Audio then averages every `pool` tokens before the final
    LayerNorm."""

    role = "audio"
    kind = "whisper"
    summary = "Whisper-style encoder over log-mel features (conv1d x 2, pre-LN blocks)"
    checkpointable = False
    mels: int = Field(default=128, gt=0, description="log-mel bins per frame (Whisper v3, Qwen2-Audio: 128)")
    width: int = Field(default=1280, gt=0, description="hidden size")
    depth: int = Field(default=32, gt=0, le=MAX_LAYERS, description="number of transformer layers")
    heads: int = Field(default=20, gt=0, le=MAX_HEADS, description="attention heads")
    mlp: int | None = Field(default=None, gt=0, description="MLP hidden size (default: 4 x width)")
    pool: int = Field(default=1, ge=1, description="average every N tokens after the blocks, before the final "
                      "LayerNorm (Qwen2-Audio: 2; Whisper: 1, none)")
    seconds: int = Field(default=30, gt=0, description="clip length: every clip is padded (or cut) to this many "
                         "seconds, as the encoder's positions are learned for one length")
    sample_rate: int = Field(default=16000, gt=0, description="samples per second the features are computed at")
    hop: int = Field(default=160, gt=0, description="samples between log-mel frames")
    n_fft: int = Field(default=400, gt=0, description="FFT window of the log-mel features")
    norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    weights: str | None = Field(default=None, description="local checkpoint folder to load this encoder from")
    dtype: Dtype = Field(default="fp32", description="parameter dtype")

    @property
    def mlp_dim(self) -> int:
        return self.mlp if self.mlp is not None else 4 * self.width

    @property
    def frames(self) -> int:
        """Log-mel frames of one padded clip."""
        return self.seconds * self.sample_rate // self.hop

    @property
    def positions(self) -> int:
        """Tokens after the stride-2 convolution: one learned position each."""
        return (self.frames - 1) // 2 + 1

    def check(self, ctx: ShapeContext) -> None:
        if self.width % self.heads:
            ctx.sink.error("E0206", f"width {self.width} is not divisible by heads {self.heads}", ctx.span_of("heads"),
                           help=f"use heads = {max(d for d in range(1, self.heads + 1) if self.width % d == 0)}")
        if self.seconds * self.sample_rate % self.hop:
            ctx.sink.error("E0280", f"a {self.seconds} s clip at {self.sample_rate} Hz is not a whole number of "
                           f"hops of {self.hop} samples", ctx.span_of("hop"),
                           help="pick a hop that divides seconds x sample_rate (Whisper: 160 at 16 kHz)")
        elif self.positions % self.pool:
            ctx.sink.error("E0280", f"{self.positions} encoder tokens are not a whole number of pools of {self.pool}",
                           ctx.span_of("pool"), help=f"pick a pool that divides {self.positions}")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        # the most tokens one clip gives; a shorter clip gives fewer (`dynamic`)
        return TokenShape(self.positions // self.pool, self.width, dynamic=True)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w, m = self.width, self.mlp_dim
        block = (linear(w, w) * 3 + linear(w, w, bias=False)  # q, v, o biased; k not
                 + layernorm(w) * 2 + linear(w, m) + linear(m, w))
        return {"embed": self.mels * w * 3 + w + w * w * 3 + w + self.positions * w,
                "blocks": self.depth * block, "norm": layernorm(w)}

    def subpaths(self) -> list[str]:
        return []  # stages freeze or train the encoder whole

    def lora_targets(self) -> list[str]:
        return []

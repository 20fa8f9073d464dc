"""Vision encoder `dinov2`: DINOv2 (and DINOv2 with registers), the self-supervised ViT that Cobra and
Prismatic pair with SigLIP.

It is a ViT with a class token, optional register tokens, layer scale, a biased patch convolution and no
pre-norm; its learned positions were trained at one size (`position_size`, 518 px for the released
towers) and are resized bicubically to whatever grid an image gives, as transformers' `Dinov2Model`
does. Switches of the other ViT kinds that DINOv2 checkpoints cannot have (tiles, windows, 2-D rope,
image layouts, ...) are refused with E0242 rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vlmspec.compiler.schema.base import ShapeContext, TokenShape, layernorm, register
from vlmspec.compiler.schema.vision import ViTBase

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def swiglu_hidden(width: int) -> int:
    """DINOv2's SwiGLU width for `mlp_ratio = 4` (ViT-g): two thirds of 4 x width, rounded up to a multiple of 8."""
    return (int(4 * width * 2 / 3) + 7) // 8 * 8


@register
class DINOv2(ViTBase):
    """DINOv2: class token (+ registers), layer scale, positions resized to the image's grid."""

    kind = "dinov2"
    summary = "DINOv2 ViT: class token, optional registers, layer scale, interpolated positions"
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="gelu", description="MLP activation "
                                                                   "(with `gated_mlp`, the gate's; default silu)")
    norm_eps: float = Field(default=1e-6, gt=0, description="LayerNorm epsilon")
    attn_bias: bool = Field(default=True, description="biases on q, k and v (transformers' `qkv_bias`); the "
                            "output projection always has one")
    pre_norm: bool = Field(default=False, description="LayerNorm on the embeddings before the first layer")
    patch_bias: bool = Field(default=True, description="bias in the patch-embedding convolution")
    layer_scale: bool = Field(default=True, description="learned per-channel scales on each block's attention "
                              "and MLP outputs before they join the residual (DINOv2's `layer_scale1/2`)")
    feature_norm: bool = Field(default=True, description="the last layer's tokens pass through the final "
                               "LayerNorm when `feature` selects them (transformers' `last_hidden_state`)")
    gated_mlp: bool = Field(default=False, description="SwiGLU FFN `down(act(gate(x)) * up(x))` as ViT-g uses "
                            "(checkpoint keys `mlp.weights_in` / `mlp.weights_out`); `act` then defaults to silu "
                            "and `mlp` to 2/3 of 4 x width, rounded up to a multiple of 8")
    mean: list[float] = Field(default=IMAGENET_MEAN, min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=IMAGENET_STD, min_length=1, description="per-channel normalisation std")
    registers: int = Field(default=0, description="register tokens after the class token (DINOv2 with "
                           "registers: 4); they carry no position and leave with `.all` only")
    position_size: int | None = Field(default=None, gt=0, description="image side in pixels the learned "
                                      "positions were trained at (the released towers: 518); an image of "
                                      "another grid resizes them bicubically (default: image_size)")
    antialias: bool | None = Field(default=None, description="antialias the bicubic resize of the positions "
                                   "(Dinov2WithRegisters does, Dinov2 does not; default: true with registers)")
    mask_token: bool = Field(default=True, description="keep DINOv2's mask token (used in pre-training only) so "
                             "a checkpoint's `embeddings.mask_token` has a place")

    #: fields of the other ViT kinds that DINOv2 has no place for: set away from their default, E0242
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "position", "resolution", "temporal_patch", "layout", "tiles", "global_layers", "tile_padding", "window",
        "full_layers", "qk_norm", "norm", "class_token", "pre_norm")

    @model_validator(mode="before")
    @classmethod
    def _swiglu_act(cls, v: Any) -> Any:
        """ViT-g's SwiGLU gates with silu: that is the activation a gated DINOv2 has unless the spec says."""
        if isinstance(v, dict) and v.get("gated_mlp") is True and "act" not in v:
            return {**v, "act": "silu"}
        return v

    @property
    def fused_qkv(self) -> bool:
        return False

    @property
    def out_bias(self) -> bool:
        return True  # transformers' Dinov2 biases the output projection whatever `qkv_bias` says

    @property
    def mlp_dim(self) -> int:
        if self.mlp is not None:
            return self.mlp
        return swiglu_hidden(self.width) if self.gated_mlp else 4 * self.width

    @property
    def position_grid(self) -> int:
        """Side of the learned position grid (patches)."""
        return (self.position_size or self.image_size) // self.patch_size

    @property
    def resize_antialias(self) -> bool:
        return self.antialias if self.antialias is not None else self.registers > 0

    def check(self, ctx: ShapeContext) -> None:
        # a refused switch is reported alone: the other kinds' checks of it (E0216 for `window` with a class
        # token, ...) would only restate that DINOv2 has no place for it
        refused = self._check_unsupported(ctx)
        if not refused:
            super().check(ctx)
        if self.registers < 0:
            ctx.sink.error("E0241", f"registers = {self.registers}: a count of register tokens cannot be negative",
                           ctx.span_of("registers"), help="use registers = 0 (DINOv2) or 4 (DINOv2 with registers)")
        if self.position_size is not None and self.position_size % self.patch_size:
            lo = self.position_size // self.patch_size * self.patch_size
            ctx.sink.error("E0243", f"position_size {self.position_size} is not a whole number of {self.patch_size}-"
                           "pixel patches: the learned positions are a square grid of patches",
                           ctx.span_of("position_size"),
                           help=f"use position_size = {lo + self.patch_size}" + (f" or {lo}" if lo else "")
                           + " (DINOv2's released towers: 518 with 14-pixel patches)")

    def _check_unsupported(self, ctx: ShapeContext) -> bool:
        """E0242 for each switch of the other ViT kinds set away from DINOv2's value; whether any was."""
        defaults = type(self).model_fields
        refused = False
        for name in self.UNSUPPORTED:
            if name in self.model_fields_set and getattr(self, name) != defaults[name].get_default(
                    call_default_factory=True):
                ctx.sink.error("E0242", f"`{name}` does not apply to a dinov2 encoder", ctx.span_of(name),
                               help=f"drop `{name}`: DINOv2 has a class token, learned positions resized to the "
                               "image, LayerNorm blocks and no pre-norm")
                refused = True
        return refused

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LoRA target's linear layer in one block: the SwiGLU's `mlp.fc1` is its fused
        `weights_in`, twice `mlp` wide."""
        w, m = self.width, self.mlp_dim
        return {"attn.q": (w, w), "attn.k": (w, w), "attn.v": (w, w), "attn.o": (w, w),
                "mlp.fc1": (w, 2 * m if self.gated_mlp else m), "mlp.fc2": (m, w)}

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        shape = super().out_shape(ctx)
        if self.feature.tokens == "all":
            return TokenShape(shape.tokens + max(self.registers, 0), shape.width)
        return shape

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w = self.width
        embed = self.channels * self.patch_size**2 * w + (w if self.patch_bias else 0)
        embed += w  # class token
        embed += w if self.mask_token else 0
        embed += max(self.registers, 0) * w
        embed += (self.position_grid**2 + 1) * w
        out = {"embeddings": embed, "layers": self.depth * self.layer_params()}
        if self.post_norm:
            out["norms"] = layernorm(w)
        return out

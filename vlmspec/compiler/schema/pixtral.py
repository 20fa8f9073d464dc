"""Vision encoder `pixtral`: Pixtral's ViT (Pixtral-12B, Mistral Small 3.1's tower), and connector
`pixtral_merger`: Mistral 3's projector after it.

A patch convolution without bias, an RMSNorm (`ln_pre`) on the patch embeddings, then pre-RMSNorm blocks
with bias-free attention and a SiLU-gated MLP; no class token, no learned positions, no final norm.
Positions are a 2-D rotary embedding over (row, column) of the patch grid whose frequency layout is
Pixtral's own: the rows rotate the first quarter of each head's channels (and its mirror) with the even
frequencies of a head-wide table, the columns the second quarter with the odd ones (`PixtralRotary` in
`runtime/vision/pixtral.py`), so it is not the `rope2d` of the `vit` kind.

Every image is read at its own size (`resolution = longest_edge()`): scaled down, aspect ratio kept, until
its longer side is at most `image_size`, then each side rounded up to whole patches (of the connector's
merge: `patch_size x merge`). In the prompt an image is a grid of image tokens, `break_token` after each
row and `end_token` in place of the last row's break (`PixtralProcessor`'s `[IMG]`, `[IMG_BREAK]`,
`[IMG_END]`); the break and end tokens are text the language model embeds.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vlmspec.compiler.schema.base import (
    MAX_LAYERS,
    CallValue,
    Schema,
    ShapeContext,
    TokenShape,
    linear,
    quote,
    register,
)
from vlmspec.compiler.schema.connectors import Act, ConnectorBase, _square_grid
from vlmspec.compiler.schema.vision import FeatureSelect, ViTBase


def longest_edge_size(height: int, width: int, longest: int, unit: int) -> tuple[int, int]:
    """(height, width) Pixtral's processor resizes an image to: scaled down (never up) by the larger of the
    two side ratios to `longest`, each side floored, then rounded up to a multiple of `unit` (patch x merge)."""
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    return ((height - 1) // unit + 1) * unit, ((width - 1) // unit + 1) * unit


class LongestEdge(Schema):
    """`longest_edge()`: each image at its own size, its longer side at most `image_size` (Pixtral)."""

    call: ClassVar[str] = "longest_edge"

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "longest_edge" or v.args or v.kwargs:
                raise ValueError("expected `longest_edge()`")
            return {}
        return v

    def to_vlm(self) -> str:
        return "longest_edge()"


@register
class Pixtral(ViTBase):
    """Pixtral's ViT: RMSNorm, Pixtral's 2-D rope, SiLU-gated MLP, every image at its own size."""

    kind = "pixtral"
    summary = "Pixtral ViT: RMSNorm, 2-D rope over (row, column), gated MLP, images at their own size"

    image_size: int = Field(default=1024, gt=0, description="the longest image side in pixels")
    patch_size: int = Field(default=16, gt=0, description="patch side in pixels")
    act: Literal["quick_gelu", "gelu", "gelu_tanh", "silu"] = Field(default="silu", description="the gated "
                                                                   "MLP's activation")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon (`ln_pre` and the blocks')")
    feature: FeatureSelect = Field(default=FeatureSelect(layers=[-1]), description="hidden states passed on, "
                                   "e.g. `layer(-1).patches`")
    rope_theta: float = Field(default=10000.0, gt=0, description="base of the 2-D rotary frequencies")
    resolution: Literal["fixed"] | LongestEdge = Field(  # type: ignore[assignment]
        default=LongestEdge(), description="`longest_edge()`: each image at its own size, the longer side at "
        "most image_size, each side rounded up to whole patches")
    break_token: str = Field(default="[IMG_BREAK]", min_length=1, description="the token the prompt holds after "
                             "each row of an image's tokens")
    end_token: str = Field(default="[IMG_END]", min_length=1, description="the token that ends an image in the "
                           "prompt, in place of its last row's break")
    # the layout switches of ViTBase, at Pixtral's values (the ones it cannot change are refused, E0260)
    class_token: bool = Field(default=False, description="prepend a learned class token")
    pre_norm: bool = Field(default=True, description="RMSNorm (`ln_pre`) on the patch embeddings")
    post_norm: bool = Field(default=False, description="norm after the last layer")
    norm: Literal["layer", "rms"] = Field(default="rms", description="the blocks' normalisation")
    gated_mlp: bool = Field(default=True, description="gated MLP `down(act(gate(x)) * up(x))`, bias-free")
    attn_bias: bool = Field(default=False, description="biases in the attention projections")
    position: Literal["learned", "rope2d"] = Field(default="rope2d", description="position encoding: Pixtral's "
                                                   "2-D rope")

    #: ViTBase fields Pixtral's checkpoints have no place for (set away from Pixtral's value: E0260)
    FIXED: ClassVar[tuple[str, ...]] = (
        "position", "temporal_patch", "layout", "tiles", "global_layers", "tile_padding", "window", "full_layers",
        "layer_scale", "qk_norm", "class_token", "pre_norm", "post_norm", "norm", "gated_mlp", "attn_bias",
        "patch_bias", "feature_norm", "fit", "video")

    @property
    def fused_qkv(self) -> bool:
        return False

    @property
    def row_tokens(self) -> tuple[str, str]:
        """The prompt's tokens besides the image token (the tokenizer needs them as special tokens)."""
        return self.break_token, self.end_token

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def check(self, ctx: ShapeContext) -> None:
        refused = False
        defaults = type(self).model_fields
        for name in self.FIXED:
            if name in defaults and name in self.model_fields_set and getattr(self, name) != defaults[name].get_default(
                    call_default_factory=True):
                ctx.sink.error("E0260", f"`{name}` does not apply to a pixtral encoder", ctx.span_of(name),
                               help=f"drop `{name}`: Pixtral has RMSNorm blocks, bias-free attention and gated MLP, "
                               "its own 2-D rope and no class token, tiles or final norm")
                refused = True
        if self.resolution == "fixed":
            ctx.sink.error("E0261", "`resolution = fixed`: a pixtral encoder reads each image at its own size and "
                           "writes it in the prompt row by row", ctx.span_of("resolution"),
                           help="use `resolution = longest_edge()` (the default)")
            refused = True
        if self.width % self.heads == 0 and self.head_dim % 4:
            ctx.sink.error("E0262", f"head width {self.head_dim} (width {self.width} / heads {self.heads}) is not a "
                           "multiple of 4: Pixtral's rope gives rows and columns a quarter of each head each, "
                           "twice", ctx.span_of("heads"),
                           help="choose width and heads so that width / heads is a multiple of 4")
        if self.break_token == self.end_token:
            ctx.sink.error("E0263", f"break_token and end_token are both {quote(self.break_token)}: the prompt "
                           "could not tell where an image ends", ctx.span_of("end_token"),
                           help='use Pixtral\'s `break_token = "[IMG_BREAK]"` and `end_token = "[IMG_END]"`')
        if not refused:
            super().check(ctx)

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        # the largest image: a square of image_size (a longer side is scaled down to it)
        return TokenShape(self.num_patches, self.width * len(self.feature.layers), True, None)

    def attn_params(self) -> int:
        return 4 * self.width * self.width

    def mlp_params(self) -> int:
        return 3 * self.width * self.mlp_dim

    def norm_params(self) -> int:
        return self.width

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        w = self.width
        return {"embeddings": self.channels * self.patch_size**2 * w, "layers": self.depth * self.layer_params(),
                "norms": w}

    def lora_targets(self) -> list[str]:
        """The gated MLP's three projections are targets of their own (one `mlp.fc1` would be two layers)."""
        return ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LoRA target's linear layer in one block."""
        w, m = self.width, self.mlp_dim
        return {"attn.q": (w, w), "attn.k": (w, w), "attn.v": (w, w), "attn.o": (w, w),
                "mlp.gate": (w, m), "mlp.up": (w, m), "mlp.down": (m, w)}

    def image_size_for(self, height: int, width: int, unit: int) -> tuple[int, int]:
        """The processor's size for an image of this size, sides in multiples of `unit` (patch x merge)."""
        return longest_edge_size(height, width, self.image_size, unit)

    def prompt(self, rows: int, cols: int, image_token: str) -> str:
        """One image in the prompt: each row's image tokens then the break token, the last break the end token."""
        row = image_token * cols
        return (row + self.break_token) * (rows - 1) + row + self.end_token


@register
class PixtralMerger(ConnectorBase):
    """Mistral 3's projector (`Mistral3MultiModalProjector`): an RMSNorm over each patch, each merge x merge
    block of patches concatenated channel by channel (patch features innermost, as `unfold` lays them out,
    not row by row as `patch_merger` does) through a bias-free `merging_layer`, then an MLP into the language
    model (`linear_1`, the activation, `linear_2`)."""

    kind = "pixtral_merger"
    summary = "Mistral 3 projector: RMSNorm, merge x merge patches through a linear layer, then an MLP"
    merge: int = Field(default=2, ge=1, description="merge an N x N block of patches into one token")  # type: ignore[assignment]
    layers: int = Field(default=2, ge=1, le=MAX_LAYERS, description="MLP layers after the merging layer")
    act: Act = Field(default="gelu", description="MLP activation")
    bias: bool = Field(default=False, description="biases in the MLP's linear layers (Mistral 3's "
                       "`multimodal_projector_bias`; the merging layer never has one)")
    norm_eps: float = Field(default=1e-5, gt=0, description="epsilon of the RMSNorm before the merge (Mistral 3: "
                            "the text model's `rms_norm_eps`)")

    def check(self, ctx: ShapeContext) -> None:
        super().check(ctx)
        if len(ctx.inputs) > 1:
            ctx.sink.error("E0264", f"pixtral_merger `{ctx.name}` merges the patches of one encoder, not "
                           f"{len(ctx.inputs)}", ctx.span_of(""), help="give each encoder its own connector")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = ctx.inputs[0] if ctx.inputs else TokenShape(0, 0)
        if not x.dynamic:
            _square_grid(ctx, x.tokens, self.merge, "merge")
        return TokenShape(x.tokens // (self.merge**2), self.out_width(ctx, x.width), x.dynamic)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        x = ctx.inputs[0] if ctx.inputs else TokenShape(0, 0)
        d = x.width
        out = self.out_width(ctx, d)
        dims = [d, *[out] * self.layers]
        mlp = sum(linear(a, b, self.bias) for a, b in zip(dims, dims[1:], strict=False))
        return {"norm": d, "merge": linear(d * self.merge**2, d, bias=False), "mlp": mlp}

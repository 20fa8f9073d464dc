"""`patches`: an encoder-free vision input (Fuyu). The image is not encoded: it is cut into `patch_size`
squares, each flattened to `channels x patch_size^2` raw values, and a connector (`linear`) projects every
patch straight into the language model's width.

Its image layout is `rows(...)` (`PatchRows`): an image keeps its aspect ratio (scaled down only when it is
larger than the canvas), is padded at the bottom and right to whole patches, and in the prompt each row of
patches is that many image tokens followed by a newline token (plain text, embedded by the language model).

It reuses the tile protocol of `layouts.py` / `tile_layouts.py`: one patch is one tile (`image_size` is the
patch side), so the processor's transform (`runtime/inputs/tiling.py`), the model's real-tile handling and
the connectors' laid-out token counts work on it unchanged.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from vlmspec.compiler.schema.base import (
    CallValue,
    ComponentSchema,
    Dtype,
    Schema,
    ShapeContext,
    TokenShape,
    quote,
    register,
)

#: the widest canvas side a `rows` layout accepts (Fuyu's is 1920): a bound on the field, not a step
MAX_CANVAS = 8192


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image once Fuyu's processor has fitted it into the canvas: unchanged when it
    fits, else scaled down by the smaller of the two side ratios, each side truncated (never scaled up)."""
    ch, cw = canvas
    if height <= ch and width <= cw:
        return height, width
    scale = min(ch / height, cw / width)
    return int(height * scale), int(width * scale)


class PatchRows(Schema):
    """`rows(canvas = [1080, 1920], newline_token = "|NEWLINE|")`: Fuyu's image layout. An image larger than the
    canvas ([height, width]) is scaled down to fit it (aspect ratio kept); it is then padded at the bottom
    and right to whole patches and read row by row, one token per patch; the prompt holds a newline token
    after each row."""

    call: ClassVar[str] = "rows"
    readers: ClassVar[tuple[str, ...]] = ("linear",)
    readers_why: ClassVar[str] = "projects one patch at a time (the row ends are newline tokens in the text)"

    canvas: tuple[PositiveInt, PositiveInt] = Field(default=(1080, 1920), description="[height, width] in pixels "
                                                    "that larger images are scaled down to fit; each side a "
                                                    "multiple of patch_size")
    newline_token: str = Field(default="|NEWLINE|", min_length=1, description="the token written after each row of "
                         "patches in the prompt")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "rows" or v.args:
                raise ValueError('expected `rows(canvas = [h, w], newline_token = "|NEWLINE|")`')
            return v.kw()
        return v

    @model_validator(mode="after")
    def _bounded(self) -> PatchRows:
        if max(self.canvas) > MAX_CANVAS:
            raise ValueError(f"a canvas side is at most {MAX_CANVAS} pixels")
        return self

    def to_vlm(self) -> str:
        return f"rows(canvas = [{self.canvas[0]}, {self.canvas[1]}], newline_token = {quote(self.newline_token)})"

    def grid(self, height: int, width: int, patch: int) -> tuple[int, int]:
        """(rows, columns) of patches of one `height x width` image, as Fuyu's processor cuts it: fitted to
        the canvas, then every partial patch at the bottom and right kept (padded)."""
        h, w = fitted_size(height, width, self.canvas)
        return math.ceil(h / patch), math.ceil(w / patch)

    def prompt(self, rows: int, cols: int, image_token: str) -> str:
        """The text one image stands for: each row's image tokens, then the newline token."""
        return (image_token * cols + self.newline_token) * rows

    # --- the layout protocol (one patch is one tile; `image_size` is the patch side)
    def tile_count(self, height: int, width: int, image_size: int) -> int:
        rows, cols = self.grid(height, width, image_size)
        return rows * cols

    def image_tokens(self, height: int, width: int, image_size: int, patch_size: int, tile_tokens: int) -> int:
        """Sequence positions one image takes: its patches and a newline token per row."""
        rows, cols = self.grid(height, width, image_size)
        return rows * (cols + 1)

    def token_range(self, image_size: int, patch_size: int, tile_tokens: int) -> tuple[int, int]:
        """The fewest and most patch features one image gives (one; a canvas-sized image's)."""
        return tile_tokens, (self.canvas[0] // image_size) * (self.canvas[1] // image_size) * tile_tokens


@register
class Patches(ComponentSchema):
    """Fuyu's encoder-free input: raw `3 x patch_size^2` (RGB) patch vectors, no parameters; a `linear`
    connector after it is Fuyu's `vision_embed_tokens`."""

    role = "vision"
    kind = "patches"
    summary = "raw image patches, no encoder (Fuyu)"

    patch_size: int = Field(default=30, gt=0, le=512, description="patch side in pixels")
    layout: PatchRows = Field(default=PatchRows(), description='`rows(canvas = [h, w], newline_token = "|NEWLINE|")`: '
                              "images keep their aspect ratio, one token per patch, a newline token per row")
    mean: list[float] = Field(default=[0.5, 0.5, 0.5], min_length=1, description="per-channel normalisation mean")
    std: list[float] = Field(default=[0.5, 0.5, 0.5], min_length=1, description="per-channel normalisation std")
    resize: Literal["bilinear", "bicubic", "nearest", "lanczos"] = Field(default="bilinear", description="filter "
                                                                          "that scales a too-large image down")
    pad_value: int = Field(default=1, ge=0, le=255, description="the 8-bit pixel value an image is padded with to "
                           "whole patches, before normalisation (Fuyu's processor: 1)")
    dtype: Dtype = Field(default="fp32", description="dtype of the patch vectors")

    @property
    def image_size(self) -> int:
        """The tile side the layout protocol reads: one patch is one tile."""
        return self.patch_size

    @property
    def channels(self) -> int:
        """RGB: images are read as 8-bit RGB (`runtime/inputs/images.py`)."""
        return 3

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    def check(self, ctx: ShapeContext) -> None:
        bad = [s for s in self.layout.canvas if s % self.patch_size]
        if bad:
            ctx.sink.error("E0250", f"canvas side {bad[0]} is not a multiple of patch_size {self.patch_size}: an "
                           "image that fills the canvas would end in a partial patch", ctx.span_of("layout"),
                           help=f"use canvas sides in whole patches, e.g. {bad[0] // self.patch_size * self.patch_size}"
                           f" or {(bad[0] // self.patch_size + 1) * self.patch_size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            ctx.sink.error("E0251", f"mean and std need {self.channels} values (one per channel) for `patches`, got "
                           f"{len(self.mean)} and {len(self.std)}", ctx.span_of("mean" if len(self.mean) !=
                                                                                self.channels else "std"),
                           help="give one value per RGB channel, e.g. `mean = [0.5, 0.5, 0.5]`")

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        # one token per tile (patch); the connector after it counts an image's tokens with the layout
        return TokenShape(1, self.patch_dim, True, (self.layout, self.patch_size, self.patch_size))

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        return {}

    def subpaths(self) -> list[str]:
        return []

    def lora_targets(self) -> list[str]:
        return []

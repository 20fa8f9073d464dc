"""Image layouts: how a processor lays an image of any size out as tiles, and how many tokens that makes.

A layout is the encoder's `layout = ...` attribute. It is data the compiler counts with (token ranges in
`vlm summary`, sequence lengths) and the runtime lays images out with, so both read one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from vlmspec.compiler.schema.base import CallValue, Schema


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint `(h, w)` an image of this size is laid out on, as LLaVA-NeXT's processor picks it: the
    most of the image's pixels kept (downscaled to fit, never counted above the original), then the least
    canvas wasted; the first on a tie."""
    best, kept, waste = (pinpoints[0][0], pinpoints[0][1]), -1, 0
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        if eff > kept or (eff == kept and h * w - eff < waste):
            best, kept, waste = (h, w), eff, h * w - eff
    return best


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows, columns) of a `rows x cols` feature grid that the image covers once the padding its canvas
    got (centred, on the longer-relative side) is cut off, as LLaVA-NeXT's `unpad_image` cuts it."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new) // 2), cols
    new = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new) // 2)


def pooled_grid(rows: int, cols: int, g: int, max_tiles: int | None) -> tuple[int, int]:
    """(rows, columns) of a feature grid once LLaVA-OneVision's `anyres_max_N` pooling has shrunk it: a grid
    over 1.1 times the side of N tiles' worth of tokens (N x g x g) is scaled down, aspect ratio kept, to
    about that many (each side floored)."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * g * g))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


class AnyRes(Schema):
    """`anyres(pinpoints = [[h, w], ...], newline = true, unpad = true)`: LLaVA-NeXT's any-resolution layout.
    Each image is resized (aspect ratio kept) and padded to the pinpoint that fits it best, cut into
    `image_size` tiles after a base tile of the whole image; after the connector the tiles' features are
    laid out as one grid, the padding cut off (`unpad`) and a learned embedding ends each row (`newline`).
    LLaVA-OneVision adds `max_tiles` (its `anyres_max_9`: a larger grid is pooled down) and reads the
    images of a prompt with several as one padded square each (`multi_image = square`)."""

    #: what every image layout says (`tile_layouts.DynamicTiles`, `tile_layouts.Split` too): its call's name,
    #: the connector kinds that may read its tiles, and why only those
    call: ClassVar[str] = "anyres"
    readers: ClassVar[tuple[str, ...]] = ("mlp",)
    readers_why: ClassVar[str] = "lays out (unpadding, newline)"

    pinpoints: list[tuple[PositiveInt, PositiveInt]] = Field(min_length=1, description="canvas sizes `[height, "
                                                             "width]` in pixels, each a multiple of image_size")
    newline: bool = Field(default=True, description="a learned embedding (the connector's `image_newline`) after "
                          "each row of the grid")
    unpad: bool = Field(default=True, description="cut the rows / columns of the grid that only cover padding")
    max_tiles: PositiveInt | None = Field(default=None, description="pool (bilinear) a grid holding over 1.1 x 1.1 "
                                          "times N tiles' worth of tokens down to about that many "
                                          "(LLaVA-OneVision's `anyres_max_9`: 9; unset: never)")
    multi_image: Literal["tiles", "square"] = Field(default="tiles", description="the images of a prompt with "
                                                    "several: `tiles`, each laid out as it would be alone; "
                                                    "`square`, each padded to a square of the mean colour and "
                                                    "read as one tile, then the newline (LLaVA-OneVision)")

    @model_validator(mode="before")
    @classmethod
    def _from_call(cls, v: Any) -> Any:
        if isinstance(v, CallValue):
            if v.name != "anyres" or v.args:
                raise ValueError("expected `anyres(pinpoints = [[h, w], ...], newline = true, unpad = true)` or `fixed`")
            return v.kw()
        return v

    def to_vlm(self) -> str:
        points = ", ".join(f"[{h}, {w}]" for h, w in self.pinpoints)
        extra = (f", max_tiles = {self.max_tiles}" if self.max_tiles is not None else "") + \
            (f", multi_image = {self.multi_image}" if self.multi_image != "tiles" else "")
        return (f"anyres(pinpoints = [{points}], newline = {str(self.newline).lower()}, "
                f"unpad = {str(self.unpad).lower()}{extra})")

    def grid(self, height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
        """(rows, columns) of one `height x width` image's feature grid after the base tile: its pinpoint's
        tiles, unpadded, pooled."""
        g = image_size // patch_size
        h, w = best_resolution(height, width, self.pinpoints)
        rows, cols = h // image_size * g, w // image_size * g
        if self.unpad:
            rows, cols = unpadded_grid(height, width, rows, cols)
        return pooled_grid(rows, cols, g, self.max_tiles)

    def tile_count(self, height: int, width: int, image_size: int) -> int:
        """The encoder's images for one `height x width` image read alone: the base tile and its pinpoint's
        tiles."""
        h, w = best_resolution(height, width, self.pinpoints)
        return 1 + (h // image_size) * (w // image_size)

    def tokens(self, height: int, width: int, image_size: int, patch_size: int) -> int:
        """Image tokens of one `height x width` image read alone: the base tile's patches, then the grid's
        rows, each with its newline."""
        g = image_size // patch_size
        rows, cols = self.grid(height, width, image_size, patch_size)
        return g * g + rows * (cols + int(self.newline))

    def image_tokens(self, height: int, width: int, image_size: int, patch_size: int, tile_tokens: int) -> int:
        """Image tokens of one image (the layout protocol; an anyres grid keeps one token per patch, so
        `tile_tokens` is the tile's patches)."""
        return self.tokens(height, width, image_size, patch_size)

    def token_range(self, image_size: int, patch_size: int, tile_tokens: int) -> tuple[int, int]:
        """The fewest and most image tokens one image can take (the layout protocol)."""
        return self.min_tokens(image_size, patch_size), self.max_tokens(image_size, patch_size)

    def square_tokens(self, image_size: int, patch_size: int) -> int:
        """Image tokens of one image of several read as one square tile (`multi_image = square`)."""
        return (image_size // patch_size) ** 2 + int(self.newline)

    def _grids(self, image_size: int, patch_size: int) -> list[tuple[int, int]]:
        """Every grid an image can leave after the base tile: each pinpoint's, with any number of rows or of
        columns cut by unpadding, then pooled."""
        g = image_size // patch_size
        out = []
        for h, w in self.pinpoints:
            rows, cols = h // image_size * g, w // image_size * g
            cuts = [(rows, cols)]
            if self.unpad:
                cuts += [(r, cols) for r in range(rows)] + [(rows, c) for c in range(cols)]
            out += [pooled_grid(r, c, g, self.max_tiles) for r, c in cuts]
        return out

    def max_tokens(self, image_size: int, patch_size: int) -> int:
        """The most tokens one image can take."""
        g = image_size // patch_size
        return g * g + max(r * (c + int(self.newline)) for r, c in self._grids(image_size, patch_size))

    def min_tokens(self, image_size: int, patch_size: int) -> int:
        """The fewest tokens one image can take (one of several, read as a square, when that is fewer)."""
        g = image_size // patch_size
        alone = g * g + min(r * (c + int(self.newline)) for r, c in self._grids(image_size, patch_size))
        return min(alone, self.square_tokens(image_size, patch_size)) if self.multi_image == "square" else alone

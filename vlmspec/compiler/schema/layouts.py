"""Image layouts: how a processor lays an image of any size out as tiles, and how many tokens that makes.

A layout is the encoder's `layout = ...` attribute. It is data the compiler counts with (token ranges in
`vlm summary`, sequence lengths) and the runtime lays images out with, so both read one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class AnyRes(Schema):
    """`anyres(pinpoints = [[h, w], ...], newline = true, unpad = true)`: LLaVA-NeXT's any-resolution layout.
    Each image is resized (aspect ratio kept) and padded to the pinpoint that fits it best, cut into
    `image_size` tiles after a base tile of the whole image; after the connector the tiles' features are
    laid out as one grid, the padding cut off (`unpad`) and a learned embedding ends each row (`newline`)."""

    pinpoints: list[tuple[PositiveInt, PositiveInt]] = Field(min_length=1, description="canvas sizes `[height, "
                                                             "width]` in pixels, each a multiple of image_size")
    newline: bool = Field(default=True, description="a learned embedding (the connector's `image_newline`) after "
                          "each row of the grid")
    unpad: bool = Field(default=True, description="cut the rows / columns of the grid that only cover padding")

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
        return (f"anyres(pinpoints = [{points}], newline = {str(self.newline).lower()}, "
                f"unpad = {str(self.unpad).lower()})")

    def tokens(self, height: int, width: int, image_size: int, patch_size: int) -> int:
        """Image tokens of one `height x width` image: the base tile's patches, then the grid's (unpadded)
        rows, each with its newline."""
        g = image_size // patch_size
        h, w = best_resolution(height, width, self.pinpoints)
        rows, cols = h // image_size * g, w // image_size * g
        if self.unpad:
            rows, cols = unpadded_grid(height, width, rows, cols)
        return g * g + rows * (cols + int(self.newline))

    def max_tokens(self, image_size: int, patch_size: int) -> int:
        """The most tokens any image can take: the largest canvas with nothing cut off."""
        g = image_size // patch_size
        return g * g + max((h // image_size * g) * (w // image_size * g + int(self.newline))
                           for h, w in self.pinpoints)

    def min_tokens(self, image_size: int, patch_size: int) -> int:
        """The fewest tokens an image can take (at most one grid row or column left after unpadding)."""
        g = image_size // patch_size
        if not self.unpad:
            return g * g + min((h // image_size * g) * (w // image_size * g + int(self.newline))
                               for h, w in self.pinpoints)
        return g * g + 1 + int(self.newline)

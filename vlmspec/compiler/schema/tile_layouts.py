"""Tile layouts of InternVL 2.5 and Idefics3 / SmolVLM: how their processors cut an image of any size into
encoder-sized tiles, how many image tokens that makes, and the prompt text that stands for one image.

Like `layouts.AnyRes`, each is an encoder's `layout = ...` value: the compiler counts sequence lengths with
it and the runtime (`runtime/inputs/tiling.py`) lays pixels out with it, so the arithmetic lives here once.
The tile side is always the encoder's `image_size`, passed in, never stored twice.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import Field, PositiveInt, model_validator

from vlmspec.compiler.schema.base import MAX_TILES, CallValue, Schema, quote

#: Hugging Face's Idefics3 / SmolVLM processors cap an image's longer side at 4096 pixels after resizing; a
#: `longest_edge` within it keeps that cap a no-op, so it is a bound on the field, not a step.
MAX_EDGE = 4096


def _flag(b: bool) -> str:
    return str(b).lower()


def _from_call(v: Any, name: str, usage: str) -> Any:
    """A `CallValue` named `name` -> its keyword arguments; anything else passes through to pydantic."""
    if isinstance(v, CallValue):
        if v.name != name or v.args:
            raise ValueError(f"expected `{usage}` or `fixed`")
        return v.kw()
    return v


# ----------------------------------------------------------------------------------------------- InternVL


def tile_grids(least: int, most: int) -> list[tuple[int, int]]:
    """The (columns, rows) grids of `least..most` tiles in the order InternVL's processor tries them: by tile
    count, and within a count by columns then rows (the order matters: ties keep the earlier or later one)."""
    grids = [(c, r) for c in range(1, most + 1) for r in range(1, most + 1) if least <= c * r <= most]
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: keeps the column-major order within a count


def best_grid(height: int, width: int, tile: int, least: int, most: int) -> tuple[int, int]:
    """(rows, columns) of tiles for a `height x width` image, as InternVL's processor picks them: the grid whose
    aspect ratio (columns / rows) is closest to the image's; on an exact tie the later (larger) grid, but only
    while the image has more than half that grid's pixels, so a small image is not cut into many tiles."""
    ratio, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in tile_grids(least, most):
        diff = abs(ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (rows, cols), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (rows, cols)
    return best


class DynamicTiles(Schema):
    """`dynamic_tiles(min = 1, max = 12, thumbnail = true)`: InternVL 2.5's dynamic resolution. The image is
    stretched onto the grid of `min..max` `image_size` tiles closest to its aspect ratio and cut row by row;
    when that makes more than one tile, the whole image stretched to one tile (the thumbnail) follows them.
    In the prompt each image is `start`, the image token once per token of every tile, then `end`."""

    call: ClassVar[str] = "dynamic_tiles"
    readers: ClassVar[tuple[str, ...]] = ("mlp", "linear", "pixel_shuffle")
    readers_why: ClassVar[str] = "reads one by one, token for token or block for block"

    min: PositiveInt = Field(default=1, le=MAX_TILES, description="fewest tiles an image is cut into")
    max: PositiveInt = Field(default=12, le=MAX_TILES, description="most tiles an image is cut into (1: no "
                             "tiling, each image is one stretched tile)")
    thumbnail: bool = Field(default=True, description="the whole image as one more tile, after the others, when "
                            "it is cut into more than one")
    start: str = Field(default="<img>", min_length=1, description="text before an image's tokens in the prompt")
    end: str = Field(default="</img>", min_length=1, description="text after an image's tokens in the prompt")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return _from_call(v, "dynamic_tiles", "dynamic_tiles(min = 1, max = 12, thumbnail = true)")

    @model_validator(mode="after")
    def _ordered(self) -> DynamicTiles:
        if self.min > self.max:
            raise ValueError(f"`min = {self.min}` tiles is more than `max = {self.max}`")
        return self

    def to_vlm(self) -> str:
        extra = "".join(f", {k} = {quote(getattr(self, k))}" for k in ("start", "end")
                        if getattr(self, k) != type(self).model_fields[k].default)
        return f"dynamic_tiles(min = {self.min}, max = {self.max}, thumbnail = {_flag(self.thumbnail)}{extra})"

    def grid(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """(rows, columns) of tiles a `height x width` image is cut into; (1, 1) when `max` is 1 (the
        processor then only stretches the image to one tile)."""
        if self.max == 1:
            return 1, 1
        return best_grid(height, width, image_size, self.min, self.max)

    def _with_thumbnail(self, n: int) -> int:
        return n + int(self.thumbnail and n != 1)

    def tiles(self, height: int, width: int, image_size: int) -> int:
        """Tiles (the encoder's images) for one `height x width` image, the thumbnail included."""
        rows, cols = self.grid(height, width, image_size)
        return self._with_thumbnail(rows * cols)

    def tokens(self, height: int, width: int, image_size: int, tile_tokens: int) -> int:
        """Image tokens (embeddings from the connector) of one image, `tile_tokens` per tile; the `start` /
        `end` text around them is not counted."""
        return self.tiles(height, width, image_size) * tile_tokens

    def tile_count(self, height: int, width: int, image_size: int) -> int:
        """The encoder's images (tiles) for one `height x width` image (every tile layout says it so)."""
        return self.tiles(height, width, image_size)

    def image_tokens(self, height: int, width: int, image_size: int, patch_size: int, tile_tokens: int) -> int:
        """Image tokens of one image (the layout protocol)."""
        return self.tokens(height, width, image_size, tile_tokens)

    def token_range(self, image_size: int, patch_size: int, tile_tokens: int) -> tuple[int, int]:
        """The fewest and most image tokens one image can take (the layout protocol)."""
        return self.min_tokens(tile_tokens), self.max_tokens(tile_tokens)

    def max_tiles(self) -> int:
        """The most tiles an image can take: `max` of them (an image as wide as `max` tiles, say), and the
        thumbnail."""
        return self._with_thumbnail(self.max)

    def min_tiles(self) -> int:
        """The fewest tiles an image can take: `min` (an image of that aspect ratio), with its thumbnail when
        that is more than one; one stretched tile when `max` is 1."""
        return 1 if self.max == 1 else self._with_thumbnail(self.min)

    def max_tokens(self, tile_tokens: int) -> int:
        return self.max_tiles() * tile_tokens

    def min_tokens(self, tile_tokens: int) -> int:
        return self.min_tiles() * tile_tokens

    def prompt(self, tiles: int, image_token: str, tile_tokens: int) -> str:
        """The text that replaces one image placeholder: `start`, `image_token` `tiles * tile_tokens` times,
        `end` (as InternVL's processor expands it)."""
        return f"{self.start}{image_token * (tiles * tile_tokens)}{self.end}"


# ---------------------------------------------------------------------------------------- Idefics3 / SmolVLM


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) Idefics3's processor first resizes an image to: the longer side (the width on a tie)
    set to `longest`, up or down; the other scaled with the aspect ratio, truncated, made even by adding one
    when odd (so a square image with an odd `longest` becomes one pixel taller than wide), at least 1."""
    ratio = width / height
    if width >= height:
        w, h = longest, int(longest / ratio)
        h += h % 2
    else:
        h, w = longest, int(longest * ratio)
        w += w % 2
    return max(h, 1), max(w, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) that image is then resized to for the encoder: the longer side (the width on a tie)
    rounded up to a multiple of `tile`, the other side scaled from that rounded side with the aspect ratio,
    truncated, then also rounded up to a multiple of `tile`."""
    ratio = width / height
    if width >= height:
        w = math.ceil(width / tile) * tile
        h = math.ceil(int(w / ratio) / tile) * tile
    else:
        h = math.ceil(height / tile) * tile
        w = math.ceil(int(h * ratio) / tile) * tile
    return h, w


class Split(Schema):
    """`split(longest_edge = 1456, tiles = true)`: Idefics3's and SmolVLM's image splitting. The image is
    resized so its longer side is `longest_edge`, then both sides up to multiples of `image_size`; when that
    is more than one tile it is cut into `rows x cols` tiles row by row and the whole (resized) image follows
    as one more, the global image. An image that fits one tile, or every image with `tiles = false`, is that
    global image alone. The prompt marks each tile with `around` and its `tile_token`, ends each row of tiles
    with a newline, and marks the global image with `around` and `global_token`."""

    call: ClassVar[str] = "split"
    readers: ClassVar[tuple[str, ...]] = ("mlp", "linear", "pixel_shuffle")
    readers_why: ClassVar[str] = "reads one by one, token for token or block for block"

    longest_edge: PositiveInt = Field(default=1456, le=MAX_EDGE, description="pixels of an image's longer side "
                                      "before it is cut into tiles (the processor's `size`)")
    tiles: bool = Field(default=True, description="cut an image larger than one tile into tiles plus the global "
                        "image (the processor's `do_image_splitting`); false: the global image only")
    around: str = Field(default="<fake_token_around_image>", min_length=1, description="text before each tile "
                        "in the prompt, and after the global image")
    global_token: str = Field(default="<global-img>", min_length=1, description="text that marks the global "
                              "image in the prompt")
    tile_token: str = Field(default="<row_{row}_col_{col}>", min_length=1, description="text that marks a tile "
                            "in the prompt; `{row}` and `{col}` are its 1-based row and column")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return _from_call(v, "split", "split(longest_edge = 1456, tiles = true)")

    @model_validator(mode="after")
    def _tile_token_formats(self) -> Split:
        try:
            self.tile_token.format(row=1, col=1)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"`tile_token = {quote(self.tile_token)}` can only use `{{row}}` and `{{col}}` "
                             f"(and `{{{{` / `}}}}` for braces): {type(e).__name__} {e}") from None
        return self

    def to_vlm(self) -> str:
        extra = "".join(f", {k} = {quote(getattr(self, k))}" for k in ("around", "global_token", "tile_token")
                        if getattr(self, k) != type(self).model_fields[k].default)
        return f"split(longest_edge = {self.longest_edge}, tiles = {_flag(self.tiles)}{extra})"

    def _grid_of_resized(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """(rows, cols) from the size after the longest-edge resize."""
        if not self.tiles:
            return 0, 0
        h, w = tile_multiple_size(height, width, image_size)
        if h > image_size or w > image_size:
            return h // image_size, w // image_size
        return 0, 0

    def grid(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """(rows, cols) of tiles for a `height x width` image; (0, 0) when it is the global image alone (as the
        processors report it: a 1 x 1 split never happens)."""
        return self._grid_of_resized(*longest_edge_size(height, width, self.longest_edge), image_size)

    @staticmethod
    def images(rows: int, cols: int) -> int:
        """Encoder images for a grid: the tiles and the global image."""
        return rows * cols + 1

    def tokens(self, height: int, width: int, image_size: int, tile_tokens: int) -> int:
        """Image tokens (embeddings from the connector) of one image, `tile_tokens` per tile and for the global
        image; the marker text around them is not counted."""
        return self.images(*self.grid(height, width, image_size)) * tile_tokens

    def tile_count(self, height: int, width: int, image_size: int) -> int:
        """The encoder's images (tiles and the global image) for one `height x width` image."""
        return self.images(*self.grid(height, width, image_size))

    def image_tokens(self, height: int, width: int, image_size: int, patch_size: int, tile_tokens: int) -> int:
        """Image tokens of one image (the layout protocol)."""
        return self.tokens(height, width, image_size, tile_tokens)

    def token_range(self, image_size: int, patch_size: int, tile_tokens: int) -> tuple[int, int]:
        """The fewest and most image tokens one image can take (the layout protocol)."""
        return self.min_tokens(image_size, tile_tokens), self.max_tokens(image_size, tile_tokens)

    def _image_counts(self, image_size: int) -> list[int]:
        """Encoder images for every size the longest-edge resize can produce: one side `longest_edge`, the
        other any truncated value 0..longest_edge made even and at least 1 (the wider-or-square case may
        reach `longest_edge + 1`)."""
        edge = self.longest_edge
        sizes = {(max(x + x % 2, 1), edge) for x in range(edge + 1)}  # wider than tall, or square
        sizes |= {(edge, max(x + x % 2, 1)) for x in range(edge)}  # taller than wide
        return [self.images(*self._grid_of_resized(h, w, image_size)) for h, w in sizes]

    def max_tokens(self, image_size: int, tile_tokens: int) -> int:
        return max(self._image_counts(image_size)) * tile_tokens

    def min_tokens(self, image_size: int, tile_tokens: int) -> int:
        return min(self._image_counts(image_size)) * tile_tokens

    def prompt(self, rows: int, cols: int, image_token: str, tile_tokens: int) -> str:
        """The text that replaces one image placeholder, as Idefics3's and SmolVLM's processors expand it: for
        a split image, each row's tiles (`around`, the tile's token, `image_token` x `tile_tokens`) then a
        newline, then one more newline before the global image (`around`, `global_token`, the image tokens,
        `around`); an image not split is that global part alone."""
        body = image_token * tile_tokens
        glob = f"{self.around}{self.global_token}{body}{self.around}"
        if rows == 0 and cols == 0:
            return glob
        lines = ("".join(f"{self.around}{self.tile_token.format(row=r, col=c)}{body}" for c in range(1, cols + 1))
                 + "\n" for r in range(1, rows + 1))
        return "".join(lines) + "\n" + glob

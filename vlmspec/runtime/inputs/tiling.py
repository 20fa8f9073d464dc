"""Pixels for the tile layouts of `compiler/schema/tile_layouts.py` (InternVL 2.5's `dynamic_tiles`,
Idefics3 / SmolVLM's `split`), laid out as Hugging Face's PIL image processors lay them out.

Every resize is a PIL resize of the 8-bit image, as the processors do it, so the pixels match theirs; the
grid arithmetic comes from the layout schema, so the prompt the processor writes and the pixels agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlmspec.compiler.schema.patches import PatchRows, fitted_size
from vlmspec.compiler.schema.tile_layouts import DynamicTiles, Split, longest_edge_size, tile_multiple_size
from vlmspec.runtime.inputs.images import ImageInput, ImageTransform, open_image


@dataclass(frozen=True, slots=True)
class TiledImage:
    """One image laid out as tiles: pixels [tiles x 3 x size x size] in the processor's order (the thumbnail /
    global image last), the grid (rows, cols) the prompt is written from ((0, 0) for a `split` image that is
    its global image alone) and the image's original (height, width)."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    size: tuple[int, int]

    @property
    def tiles(self) -> int:
        return self.pixels.shape[0]


def _cut(pil: Image.Image, rows: int, cols: int, size: int) -> list[Image.Image]:
    """A `rows*size x cols*size` image's tiles, row by row."""
    return [pil.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]


def _resized(pil: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    return pil if pil.size == (width, height) else pil.resize((width, height), resample)


class _TileTransform(ImageTransform):
    """Shared by both layouts: the tile side, mean / std and filter of the encoder, and batching."""

    facts = "image_sizes"

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str, layout: Any):
        super().__init__(size, mean, std, resize)
        self.layout = layout

    def _item(self, tiles: list[Image.Image], grid: tuple[int, int], pil: Image.Image) -> TiledImage:
        return TiledImage(torch.stack([self.normalise(t) for t in tiles]), grid, (pil.height, pil.width))

    def stack(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (pixels [b x most tiles x 3 x size x size], each image's tiles first and zero tiles after them, as
        Idefics3's processor pads; the images' original (height, width) [b x 2], from which the model counts
        each image's tiles with the layout, as the processor did)."""
        most = max(t.tiles for t in items)
        px = torch.zeros(len(items), most, *items[0].pixels.shape[1:])
        for i, t in enumerate(items):
            px[i, : t.tiles] = t.pixels
        return px, torch.tensor([t.size for t in items])

    def tokens(self, item: TiledImage, tile_tokens: int) -> int:
        """Image tokens of one laid-out image: `tile_tokens` per tile."""
        return item.tiles * tile_tokens


class DynamicTilesTransform(_TileTransform):
    """InternVL 2.5's processor: the image stretched onto its grid of tiles (`DynamicTiles.grid`) and cut row by
    row, then, when there is more than one tile and the layout asks for it, the whole original image
    stretched to one tile as the thumbnail, last."""

    layout: DynamicTiles

    def __call__(self, img: ImageInput) -> TiledImage:
        pil = open_image(img)
        s = self.size
        rows, cols = self.layout.grid(pil.height, pil.width, s)
        tiles = _cut(_resized(pil, rows * s, cols * s, self.filter), rows, cols, s)
        if self.layout.thumbnail and len(tiles) != 1:
            tiles.append(_resized(pil, s, s, self.filter))
        return self._item(tiles, (rows, cols), pil)

    def prompt(self, item: TiledImage, image_token: str, tile_tokens: int) -> str:
        return self.layout.prompt(item.tiles, image_token, tile_tokens)


class SplitTransform(_TileTransform):
    """Idefics3's and SmolVLM's processor: the image resized to its longest edge, then to multiples of the tile
    side; when larger than one tile, cut row by row and followed by that resized image shrunk to one tile (the
    global image, last); otherwise that one tile alone. With `tiles = false` the longest-edge image is
    stretched to one tile. Each step resizes the previous step's image, as the processor does."""

    layout: Split

    def __call__(self, img: ImageInput) -> TiledImage:
        pil = open_image(img)
        s = self.size
        first = _resized(pil, *longest_edge_size(pil.height, pil.width, self.layout.longest_edge), self.filter)
        if not self.layout.tiles:
            return self._item([_resized(first, s, s, self.filter)], (0, 0), pil)
        resized = _resized(first, *tile_multiple_size(first.height, first.width, s), self.filter)
        rows, cols = self.layout.grid(pil.height, pil.width, s)
        if rows == 0:
            return self._item([resized], (0, 0), pil)  # one tile already
        return self._item([*_cut(resized, rows, cols, s), _resized(resized, s, s, self.filter)], (rows, cols), pil)

    def prompt(self, item: TiledImage, image_token: str, tile_tokens: int) -> str:
        return self.layout.prompt(*item.grid, image_token, tile_tokens)


class PatchRowsTransform(_TileTransform):
    """Fuyu's processor (`patches` with `layout = rows(...)`): the image scaled down to fit the canvas when it
    is larger (aspect ratio kept), padded at the bottom and right with `pad_value` to whole patches,
    normalised, and cut row by row into patches, each one a tile; the prompt is each row's image tokens and
    the newline token."""

    layout: PatchRows

    def __init__(self, cfg: Any):
        super().__init__(cfg.patch_size, list(cfg.mean), list(cfg.std), cfg.resize, cfg.layout)
        self.pad = (cfg.pad_value,) * 3

    def __call__(self, img: ImageInput) -> TiledImage:
        pil = open_image(img)
        p = self.size
        h, w = fitted_size(pil.height, pil.width, self.layout.canvas)
        rows, cols = self.layout.grid(pil.height, pil.width, p)
        canvas = Image.new("RGB", (cols * p, rows * p), self.pad)
        canvas.paste(_resized(pil, h, w, self.filter), (0, 0))
        x = self.normalise(canvas)  # [3 x rows*p x cols*p]
        patches = x.unfold(1, p, p).unfold(2, p, p)  # [3 x rows x cols x p x p]
        return TiledImage(patches.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, p, p), (rows, cols),
                          (pil.height, pil.width))

    def prompt(self, item: TiledImage, image_token: str, tile_tokens: int) -> str:
        return self.layout.prompt(*item.grid, image_token)


def tile_transform(cfg: Any) -> _TileTransform:
    """The transform of an encoder whose `layout` is a tile layout (`dynamic_tiles`, `split` or `rows`)."""
    if isinstance(cfg.layout, PatchRows):
        return PatchRowsTransform(cfg)
    kind = DynamicTilesTransform if isinstance(cfg.layout, DynamicTiles) else SplitTransform
    return kind(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, cfg.layout)

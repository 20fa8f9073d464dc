"""Image loading and preprocessing from the spec (size, resize filter, mean/std), with PIL only.

Every way an image can be bad (missing, unreadable, a decompression bomb, absurdly large) becomes
a one-line `UserInputError`, because images come from users and datasets, not from us.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmspec.diagnostics import user_error

#: Larger images are refused before decoding (PIL's own bomb check is only a warning below 2x this).
MAX_PIXELS = 64 * 1024 * 1024
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}

ImageInput = str | Path | bytes | Image.Image


def open_image(src: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image, as RGB; refuse bombs and unreadable files."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    name = "image bytes" if isinstance(src, bytes) else str(src)
    try:
        if isinstance(src, bytes):
            fp: Any = io.BytesIO(src)
        else:
            path = Path(src)
            if not path.is_file():
                raise user_error("E0501", f"image not found: {path}")
            fp = path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.width * img.height > max_pixels:
                raise user_error("E0503", f"{name} is {img.width}x{img.height} pixels, over the limit of "
                                 f"{max_pixels:,}", help="resize it first")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise user_error("E0502", f"cannot read {name}: not a valid image ({type(e).__name__})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise user_error("E0503", f"{name} is a decompression bomb (too many pixels for its size)") from None
    return img.convert("RGB")


class ImageTransform:
    """Resize to the encoder's square input, scale to [0, 1], normalise with the spec's mean and std.
    `from_encoder` gives a `TiledImageTransform` for a tiled encoder (Llama 3.2 Vision)."""

    #: the model argument that carries what `stack` returns beside the pixels (None: nothing)
    facts: str | None = None

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str = "bicubic", fit: str = "stretch"):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.filter = _FILTERS[resize]
        self.fit_rule = fit
        # LLaVA pads with the mean colour, as 0-255 integers (transformers' `int(m * 255)`)
        self.fill = tuple(int(m * 255) for m in mean)

    @classmethod
    def from_encoder(cls, cfg: Any) -> ImageTransform:
        layout = getattr(cfg, "layout", "fixed")
        if getattr(layout, "call", None) == "anyres":
            return AnyResImageTransform(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, cfg.layout,
                                        cfg.patch_size)
        if not isinstance(layout, str):
            from vlmspec.runtime.inputs.tiling import tile_transform

            return tile_transform(cfg)
        if getattr(cfg, "tiles", 0):
            return TiledImageTransform(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, cfg.tiles)
        return cls(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, getattr(cfg, "fit", "stretch"))

    def normalise(self, pil: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (arr - self.mean) / self.std

    def __call__(self, img: ImageInput) -> Any:
        """-> `[3 x size x size]` float32."""
        pil = self.square(open_image(img))
        if pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), self.filter)
        return self.normalise(pil)

    def square(self, pil: Image.Image) -> Image.Image:
        """The encoder's `fit` as transformers' image processors do it: `crop` resizes the shorter side to
        `size` (the longer one to `int(size * long / short)`) and cuts the centre (offset `(extra) // 2`);
        `pad` centres the image on a square of the mean colour (offset `(long - short) // 2`); `stretch`
        leaves it to the final resize."""
        w, h = pil.size
        if self.fit_rule == "crop" and (w, h) != (self.size, self.size):
            s = self.size
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            if (nw, nh) != (w, h):
                pil = pil.resize((nw, nh), self.filter)
            left, top = (nw - s) // 2, (nh - s) // 2
            return pil.crop((left, top, left + s, top + s))
        if self.fit_rule == "pad":
            return self.pad_square(pil)
        return pil

    def pad_square(self, pil: Image.Image) -> Image.Image:
        """The image centred on a square of the mean colour (offset `(long - short) // 2`)."""
        w, h = pil.size
        if w == h:
            return pil
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
        return canvas

    def stack(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs of this transform, one per image -> (pixel_values, the images' facts named by `facts`, or
        None)."""
        return torch.stack(items), None

    def batch(self, images: list[ImageInput]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.stack([self(i) for i in images])


@dataclass(frozen=True, slots=True)
class Tiles:
    """One image cut into tiles: pixels [tiles x 3 x size x size] (unused tiles zero) and its layout id."""

    pixels: torch.Tensor
    aspect_ratio_id: int


class TiledImageTransform(ImageTransform):
    """Llama 3.2 Vision's tiling, as its processor does it: among the layouts of up to `tiles` tiles (rows x
    columns, Mllama's order), the canvas that needs the least upscaling, else the least downscaling (the
    smaller canvas on a tie); the image resized to fit it with its aspect ratio kept, padded at the bottom
    and right with black, normalised, cut into tiles row by row; the tiles left over are zero."""

    facts = "aspect_ratio_ids"

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str, tiles: int):
        super().__init__(size, mean, std, resize)
        self.tiles = tiles
        self.layouts = [(r, c) for r in range(1, tiles + 1) for c in range(1, tiles + 1) if r * c <= tiles]

    def canvas(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of this size."""
        s = self.size
        scales = [min(r * s / height, c * s / width) for r, c in self.layouts]
        up = [x for x in scales if x >= 1]
        best = min(up) if up else max(scales)
        chosen = [lay for lay, x in zip(self.layouts, scales, strict=True) if x == best]
        return min(chosen, key=lambda lay: lay[0] * lay[1])  # first of the smallest area, as Mllama picks

    def fit(self, height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
        """(height, width) of the image resized into its canvas, aspect ratio kept, at least one tile a side."""
        s = self.size
        target_w, target_h = min(max(width, s), cols * s), min(max(height, s), rows * s)
        scale_h, scale_w = target_h / height, target_w / width
        if scale_w < scale_h:
            return min(math.floor(height * scale_w) or 1, target_h), target_w
        return target_h, min(math.floor(width * scale_h) or 1, target_w)

    def __call__(self, img: ImageInput) -> Tiles:
        pil = open_image(img)
        rows, cols = self.canvas(pil.height, pil.width)
        h, w = self.fit(pil.height, pil.width, rows, cols)
        if (pil.width, pil.height) != (w, h):
            pil = pil.resize((w, h), self.filter)
        s = self.size
        canvas = Image.new("RGB", (cols * s, rows * s))  # black, normalised with the rest
        canvas.paste(pil, (0, 0))
        x = self.normalise(canvas)  # [3 x rows*s x cols*s]
        tiles = x.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        out = torch.zeros(self.tiles, 3, s, s)
        out[: rows * cols] = tiles
        return Tiles(out, self.layouts.index((rows, cols)) + 1)

    def stack(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.stack([t.pixels for t in items]), torch.tensor([t.aspect_ratio_id for t in items])


@dataclass(frozen=True, slots=True)
class AnyResTiles:
    """One image laid out for an anyres encoder: pixels [1 + rows * cols x 3 x size x size] (the base tile
    first) and the image's original (height, width), which the model needs to cut the padding off."""

    pixels: torch.Tensor
    size: tuple[int, int]
    #: read as one square tile, as one of several images in a prompt (`multi_image = square`)
    square: bool = False


class AnyResImageTransform(ImageTransform):
    """LLaVA-NeXT's processor: the image resized (aspect ratio kept, the fitted side exact, the other
    `ceil`-ed) onto the best pinpoint canvas, centred on black (zero pixels, normalised with the rest), cut
    into tiles row by row; the whole image stretched to one tile goes first."""

    facts = "image_sizes"

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str, layout: Any, patch_size: int):
        super().__init__(size, mean, std, resize)
        self.layout, self.patch_size = layout, patch_size

    @staticmethod
    def fitted(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
        """(height, width) of the image resized into the canvas, aspect ratio kept."""
        sw, sh = canvas_w / width, canvas_h / height
        if sw < sh:
            return min(math.ceil(height * sw), canvas_h), canvas_w
        return canvas_h, min(math.ceil(width * sh), canvas_w)

    def __call__(self, img: ImageInput) -> AnyResTiles:
        from vlmspec.compiler.schema.layouts import best_resolution

        pil = open_image(img)
        ch, cw = best_resolution(pil.height, pil.width, self.layout.pinpoints)
        h, w = self.fitted(pil.height, pil.width, ch, cw)
        canvas = Image.new("RGB", (cw, ch))
        canvas.paste(pil.resize((w, h), self.filter) if (w, h) != pil.size else pil, ((cw - w) // 2, (ch - h) // 2))
        s = self.size
        x = self.normalise(canvas)
        rows, cols = ch // s, cw // s
        tiles = x.view(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        base = self.normalise(pil.resize((s, s), self.filter) if pil.size != (s, s) else pil)
        return AnyResTiles(torch.cat([base[None], tiles]), (pil.height, pil.width))

    def one_of_several(self, img: ImageInput) -> AnyResTiles:
        """One image of a prompt with several, as a `multi_image = square` layout reads it (LLaVA-OneVision's
        processor): padded to a square of the mean colour, resized to one tile; else laid out as alone."""
        if self.layout.multi_image != "square":
            return self(img)
        pil = open_image(img)
        size = (pil.height, pil.width)
        pil, s = self.pad_square(pil), self.size
        x = self.normalise(pil.resize((s, s), self.filter) if pil.size != (s, s) else pil)
        return AnyResTiles(x[None], size, square=True)

    def tokens(self, item: AnyResTiles) -> int:
        if item.square:
            return self.layout.square_tokens(self.size, self.patch_size)
        return self.layout.tokens(*item.size, self.size, self.patch_size)

    def stack(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (pixels [b x most tiles x 3 x size x size], zero tiles after each image's own, as transformers
        pads them; the images' (height, width) [b x 2])."""
        most = max(t.pixels.shape[0] for t in items)
        px = torch.zeros(len(items), most, *items[0].pixels.shape[1:])
        for i, t in enumerate(items):
            px[i, : t.pixels.shape[0]] = t.pixels
        return px, torch.tensor([t.size for t in items])


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's processor size for an image: each side rounded to a multiple of `factor`, then scaled
    (aspect ratio kept) into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise user_error("E0503", f"an image of {width}x{height} pixels: an aspect ratio over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


class NativeImageTransform(ImageTransform):
    """A dynamic-resolution encoder's input as Qwen2-VL's processor makes it: the image resized (aspect
    ratio kept) to sides that are multiples of `factor` (patch x merge) within [min_pixels, max_pixels]
    (`smart_resize`), scaled and normalised: `[3 x h x w]`, its own size."""

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str, factor: int, min_pixels: int,
                 max_pixels: int):
        super().__init__(size, mean, std, resize)
        self.factor, self.min_pixels, self.max_pixels = factor, min_pixels, max_pixels

    facts = "image_sizes"

    def __call__(self, img: ImageInput) -> Any:
        pil = open_image(img)
        h, w = smart_resize(pil.height, pil.width, self.factor, self.min_pixels, self.max_pixels)
        return self.normalise(pil.resize((w, h), self.filter))

    def stack(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images of one size -> ([b x 3 x h x w], None); of several sizes -> (each padded at the bottom and
        right with zeros to [b x 3 x H x W], their (h, w) [b x 2]), which the model cuts back and encodes
        one size at a time (training batches mix sizes; generation batches one size, `size_groups`)."""
        if len({tuple(x.shape) for x in items}) == 1:
            return torch.stack(items), None
        hh, ww = max(x.shape[-2] for x in items), max(x.shape[-1] for x in items)
        px = torch.zeros(len(items), items[0].shape[0], hh, ww)
        for i, x in enumerate(items):
            px[i, :, : x.shape[-2], : x.shape[-1]] = x
        return px, torch.tensor([tuple(x.shape[-2:]) for x in items])

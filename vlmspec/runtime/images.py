"""Image loading and preprocessing from the spec (size, resize filter, mean/std), with PIL only.

Every way an image can be bad (missing, unreadable, a decompression bomb, absurdly large) becomes
a one-line `UserInputError`, because images come from users and datasets, not from us.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmspec.diagnostics import user_error

#: Larger images are refused before decoding (PIL's own bomb check is only a warning below 2x this).
MAX_PIXELS = 64 * 1024 * 1024
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}

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
    """Resize to the encoder's square input, scale to [0, 1], normalise with the spec's mean and std."""

    def __init__(self, size: int, mean: list[float], std: list[float], resize: str = "bicubic"):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.filter = _FILTERS[resize]

    @classmethod
    def from_encoder(cls, cfg: Any) -> ImageTransform:
        return cls(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize)

    def __call__(self, img: ImageInput) -> torch.Tensor:
        """-> `[3 x size x size]` float32."""
        pil = open_image(img)
        if pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), self.filter)
        arr = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (arr - self.mean) / self.std

    def batch(self, images: list[ImageInput]) -> torch.Tensor:
        return torch.stack([self(i) for i in images])

"""Pixtral's image input (`resolution = longest_edge()`): each image at its own size, and its rows in the prompt.

A `NativeImageTransform` (the native-size path Qwen2-VL uses: one size per generation batch, several sizes
padded with `image_sizes` in a training batch) whose resize is Pixtral's instead of `smart_resize`, and whose
prompt text is the image's grid of image tokens with the encoder's break token after each row and its end
token after the last (`PixtralProcessor.replace_image_token`).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmspec.runtime.inputs.images import ImageInput, NativeImageTransform, open_image


class LongestEdgeTransform(NativeImageTransform):
    """The image scaled down (never up) until its longer side is at most `image_size`, each side then rounded
    up to a multiple of `factor` (patch x merge), bicubic; scaled and normalised: `[3 x h x w]`."""

    def __init__(self, cfg: Any, factor: int):
        super().__init__(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, factor, 1, cfg.image_size**2)
        self.cfg = cfg

    def __call__(self, img: ImageInput) -> Any:
        pil = open_image(img)
        h, w = self.cfg.image_size_for(pil.height, pil.width, self.factor)
        return self.normalise(pil.resize((w, h), self.filter) if (h, w) != (pil.height, pil.width) else pil)

    def prompt(self, pixels: torch.Tensor, image_token: str) -> str:
        """The text one transformed image stands for: rows of image tokens, a break after each, the end last."""
        h, w = pixels.shape[-2:]
        return self.cfg.prompt(h // self.factor, w // self.factor, image_token)


def native_rows(cfg: Any) -> bool:
    """Whether an encoder reads images at their own size, longest edge first, and writes them row by row."""
    return getattr(getattr(cfg, "resolution", None), "call", None) == "longest_edge"

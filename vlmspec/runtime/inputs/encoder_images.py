"""The image transform of a model whose encoders read images at different sizes or normalisations
(DeepSeek-VL: SAM at 1024 px with CLIP's statistics, SigLIP at 384 px with its own).

Every encoder must see the same picture, framed the same way, so the image is fitted once, by the
encoder with the largest input (its `fit`: a SAM tower resizes the longer side and centres the image on a
square of its mean colour), and each smaller encoder resizes that square with its own filter and
normalises it with its own mean and std: what DeepSeek-VL's processor does. The transform gives
`{encoder: [c x s x s]}` per image and stacks them into `{encoder: [b x c x s x s]}`, the per-encoder
pixel values `VisionLanguageModel.encode_images` takes. Models whose encoders share one transform keep it.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.images import ImageInput, ImageTransform, open_image

#: DeepSeek-VL's processor never lets a side shrink below this many pixels when it fits the longer one
MIN_SIDE = 14


class LongerSideTransform(ImageTransform):
    """`fit = pad` of a `sam` encoder: the longer side resized to `size` (the shorter in proportion, rounded,
    at least 14 px), then centred on a `size` square of the mean colour (DeepSeek-VL's / SAM's order:
    resize, then pad, unlike LLaVA's pad-then-resize)."""

    def square(self, pil: Image.Image) -> Image.Image:
        if self.fit_rule != "pad":
            return pil
        w, h = pil.size
        scale = self.size / max(w, h)
        nw, nh = max(round(w * scale), MIN_SIDE), max(round(h * scale), MIN_SIDE)
        if (nw, nh) != (w, h):
            pil = pil.resize((nw, nh), self.filter)
        return self.pad_square(pil)


def transform_for(cfg: Any) -> ImageTransform:
    """One encoder's transform: a `sam` encoder's fits the longer side first; the others' as the processor
    has always made them."""
    if getattr(cfg, "kind", None) == "sam":
        return LongerSideTransform(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize, cfg.fit)
    return ImageTransform.from_encoder(cfg)


def _same(a: ImageTransform, b: ImageTransform) -> bool:
    return (type(a) is type(b) and a.size == b.size and a.fit_rule == b.fit_rule and a.filter == b.filter
            and torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std))


def encoders_transform(encoders: list[Any]) -> ImageTransform | None:
    """The processor's transform for the model's vision components (`Component`s, in spec order): the
    first encoder's when every encoder reads the same pixels, else an `EncodersTransform`."""
    if not encoders:
        return None
    parts = {e.name: transform_for(e.config) for e in encoders}
    first = next(iter(parts.values()))
    if all(_same(first, t) for t in parts.values()):
        return first
    for e in encoders:
        cfg = e.config
        odd = ("tiles" if getattr(cfg, "tiles", 0) else "an image layout"
               if not isinstance(getattr(cfg, "layout", "fixed"), str) else "native resolution"
               if not isinstance(getattr(cfg, "resolution", "fixed"), str) else None)
        if odd:
            raise user_error("E0579", f"encoder `{e.name}` reads images with {odd}, and the model's encoders read "
                             "them at different sizes: one processor cannot feed both",
                             help="give every encoder the same image_size, mean and std, or drop the "
                             f"{odd} of `{e.name}`")
    return EncodersTransform(parts)


class EncodersTransform(ImageTransform):
    """One image -> `{encoder: pixels}`: fitted once by the largest encoder, resized from that square for the others."""

    def __init__(self, parts: dict[str, ImageTransform]):
        largest = max(parts.values(), key=lambda t: t.size)
        super().__init__(largest.size, largest.mean.flatten().tolist(), largest.std.flatten().tolist())
        self.parts = parts
        self.largest = largest

    def __call__(self, img: ImageInput) -> dict[str, torch.Tensor]:
        square = self.largest.square(open_image(img))
        if square.size != (self.largest.size, self.largest.size):
            square = square.resize((self.largest.size, self.largest.size), self.largest.filter)
        out = {}
        for name, t in self.parts.items():
            pil = square if t.size == self.largest.size else square.resize((t.size, t.size), t.filter)
            out[name] = t.normalise(pil)
        return out

    def stack(self, items: list[Any]) -> tuple[dict[str, torch.Tensor], None]:  # type: ignore[override]
        return {name: torch.stack([item[name] for item in items]) for name in self.parts}, None

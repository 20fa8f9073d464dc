"""How many image tokens an image takes, from its size alone: what a plan (`vlm train --dry-run`) reads from a
dataset's image headers without decoding a pixel, and the formula the processor counts its own images with.

A fixed-size encoder gives every image the fusion's count; a native-resolution one (Qwen2-VL) as many as the
image's processor size holds merged patches; a laid-out one (anyres, dynamic tiles, split) what its layout says.
"""

from __future__ import annotations

import math
from typing import Any

from vlmspec.compiler.compile import Analysis, shapes_at_image_size
from vlmspec.runtime.inputs.images import smart_resize
from vlmspec.runtime.inputs.longest_edge import native_rows


class ImageTokens:
    """Image tokens of one image of a given (height, width), for the model an analysis describes."""

    def __init__(self, analysis: Analysis):
        ir = analysis.ir
        encoders = ir.by_role("vision")
        in_seq = [f for f in ir.by_role("fusion") if type(f.config).in_sequence]
        shapes = shapes_at_image_size(analysis)
        #: the fusion's count for an image at the encoder's size (cross-attention: one marker)
        self.at_size = sum(shapes.out[f.name].tokens for f in in_seq) if in_seq else 1
        self.cfg: Any = encoders[0].config if encoders else None
        readers = [c for c in ir.by_role("connector") if encoders and encoders[0].name in c.sources]
        #: a laid-out encoder's tokens of one tile, after its connector
        self.tile_tokens = analysis.shapes.out[readers[0].name].tile_tokens if readers else None
        #: a native-resolution encoder's resize factor (patch x merge), else None
        self.factor: int | None = None
        cfg = self.cfg
        if cfg is not None and not isinstance(getattr(cfg, "resolution", "fixed"), str) and len(in_seq) == 1 \
                and not getattr(cfg, "tiles", 0):
            patches = (cfg.image_size // cfg.patch_size) ** 2
            merge = math.isqrt(patches // self.at_size)
            if merge * merge * self.at_size == patches:
                self.factor = cfg.patch_size * merge

    @property
    def layout(self) -> Any:
        layout = getattr(self.cfg, "layout", "fixed")
        return None if isinstance(layout, str) else layout

    def native(self, height: int, width: int) -> int:
        """Tokens of an image already at its processor size (sides multiples of the factor; a native-resolution
        encoder only)."""
        f = self.factor or 1
        side = self.cfg.image_size // f
        return self.at_size * (height // f) * (width // f) // (side * side)

    def __call__(self, height: int, width: int) -> int:
        """Tokens of one image of this original size, read alone."""
        if self.layout is not None and self.tile_tokens is not None:
            c = self.cfg
            return self.layout.image_tokens(height, width, c.image_size, c.patch_size, self.tile_tokens)
        if self.factor is not None and native_rows(self.cfg):  # Pixtral: each row of image tokens and its break
            h, w = self.cfg.image_size_for(height, width, self.factor)  # (or end) token, as Fuyu's rows count
            return (h // self.factor) * (w // self.factor + 1)
        if self.factor is not None:
            res = self.cfg.resolution
            return self.native(*smart_resize(height, width, self.factor, res.min_pixels, res.max_pixels))
        return self.at_size

"""Whole-VLM checkpoint formats, one module each.

A module here defines `FORMAT` (or `FORMATS`, a tuple) of `VLMFormat`; the table below is read from
every module of this package, so supporting a new Hugging Face VLM is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from vlmspec.runtime.weights.formats.base import VLMFormat

__all__ = ["VLMFormat", "formats"]


@cache
def formats() -> dict[str, VLMFormat]:
    """model_type -> its format, from every module of this package."""
    table: dict[str, VLMFormat] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = getattr(module, "FORMATS", None) or (getattr(module, "FORMAT", None),)
        for fmt in found:
            if fmt is None:
                continue
            for mt in fmt.model_types:
                if mt in table:
                    raise RuntimeError(f"model_type {mt!r} is claimed by two formats ({info.name})")
                table[mt] = fmt
    return table

"""How a grounding model writes a box in its text: the model-level setting `boxes = ...`.

Two families exist in the wild, and they differ in what a number means, so the spec must say which one a
model speaks before anything can read its boxes or write training targets for it:

- `patch_index(bins = 32)` (KOSMOS-2): the image is a bins x bins grid; a box is two cell tokens,
  `<object><patch_index_XXXX><patch_index_YYYY></object>` (top-left and bottom-right cell), optionally
  after `<phrase>...</phrase>` naming it. Coordinates are fractions of the whole image.
- `coordinates(format = "...", scale = 100 | "pixels")` (MiniGPT-v2, Qwen2.5-VL): the four numbers written
  into a template. `scale = N` means integers 0..N relative to the image's width and height; `"pixels"`
  means absolute pixels of the image as the processor resized it.

The pydantic part only shapes the call; `check` reports each distinct mistake with its own code, because a
wrong template is silent at run time (boxes simply never parse) and so must be caught by `vlm check`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from vlmspec.compiler.schema.base import CallValue, Schema, quote

#: the four names a coordinates template must hold, each once
PLACEHOLDERS = ("x1", "y1", "x2", "y2")
#: KOSMOS-2 writes a cell as `<patch_index_0044>`: four digits, so at most 10,000 cells
MAX_BINS = 100
_FIELD = re.compile(r"\{([^{}<>\[\]]*)\}")


class PatchIndexBoxes(Schema):
    """`patch_index(bins = 32)`: a box as its top-left and bottom-right cells of a bins x bins grid."""

    kind: Literal["patch_index"] = "patch_index"
    bins: int = Field(default=32, description="cells per side of the grid (KOSMOS-2: 32, 1,024 tokens)")

    def to_vlm(self) -> str:
        return f"patch_index(bins = {self.bins})"

    def check_encoders(self, sink: Any, span_of: Callable[[str], Any], components: dict[str, Any]) -> None:
        """Cells are fractions of the whole image, whatever the processor does to it: nothing to check."""

    def check(self, sink: Any, span_of: Callable[[str], Any]) -> None:
        if not 2 <= self.bins <= MAX_BINS:
            sink.error("E0295", f"`patch_index(bins = {self.bins})`: a grid needs 2 to {MAX_BINS} cells a side",
                       span_of("bins"), help="KOSMOS-2 uses `patch_index(bins = 32)` (its 1,024 "
                       "`<patch_index_XXXX>` tokens); the cell number is written with four digits")


class CoordinateBoxes(Schema):
    """`coordinates(format = "{<{x1}><{y1}><{x2}><{y2}>}", scale = 100)`: the four corners written into a
    template, either as integers 0..scale of the image's size or as pixels of the resized input."""

    kind: Literal["coordinates"] = "coordinates"
    format: str = Field(description="the box as text, with `{x1}`, `{y1}`, `{x2}`, `{y2}` where the numbers go; "
                        "other braces are literal")
    scale: int | str = Field(default=100, description="integers 0..scale relative to the image (MiniGPT-v2: "
                             "100), or `\"pixels\"`: absolute pixels of the resized input (Qwen2.5-VL)")

    def to_vlm(self) -> str:
        scale = quote(self.scale) if isinstance(self.scale, str) else str(self.scale)
        return f"coordinates(format = {quote(self.format)}, scale = {scale})"

    def check_encoders(self, sink: Any, span_of: Callable[[str], Any], components: dict[str, Any]) -> None:
        """`scale = "pixels"` counts in the resized input, which maps back to the image axis by axis only when
        the whole image was stretched onto it (or resized keeping its shape, as a dynamic encoder does): a
        square encoder that crops or pads would read every box in the wrong place (E0298)."""
        if self.scale != "pixels":
            return
        for comp in components.values():
            fit = getattr(comp.config, "fit", None)
            if comp.role == "vision" and fit in ("crop", "pad") and getattr(comp.config, "resolution", None) == "fixed":
                sink.error("E0298", f"`scale = \"pixels\"` counts pixels of the resized input, and vision `{comp.name}` "
                           f"has fit = {fit}: its square holds {'a centre crop of' if fit == 'crop' else 'padding around'}"
                           " the image, so a box in it does not map back axis by axis", span_of("scale"),
                           help="use a relative scale (`scale = 100` or `1000`: fractions of the original image), or "
                           "`fit = stretch`")
                return

    def fields(self) -> list[str]:
        """The placeholder names in the template, in order (a `{...}` holding a known name)."""
        return [m.group(1) for m in _FIELD.finditer(self.format)]

    def check(self, sink: Any, span_of: Callable[[str], Any]) -> None:
        names = self.fields()
        wrong = [n for n in names if n not in PLACEHOLDERS]
        missing = [n for n in PLACEHOLDERS if n not in names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if wrong or missing or twice:
            what = "; ".join(part for part in (
                wrong and "unknown " + ", ".join(f"`{{{n}}}`" for n in wrong),
                missing and "missing " + ", ".join(f"`{{{n}}}`" for n in missing),
                twice and "repeated " + ", ".join(f"`{{{n}}}`" for n in twice)) if part)
            sink.error("E0294", f"box format {quote(self.format)}: {what}", span_of("format"),
                       help="write each of `{x1}`, `{y1}`, `{x2}`, `{y2}` once, e.g. "
                       "`format = \"[{x1}, {y1}, {x2}, {y2}]\"`")
            return
        if re.search(r"\{(x1|y1|x2|y2)\}\{(x1|y1|x2|y2)\}", self.format):
            sink.error("E0297", f"box format {quote(self.format)}: two numbers written with nothing between them "
                       "cannot be read back", span_of("format"),
                       help="put a separator between placeholders, e.g. `<{x1}><{y1}>` or `{x1}, {y1}`")
        if isinstance(self.scale, str):
            if self.scale != "pixels":
                sink.error("E0296", f"box scale {quote(self.scale)} is neither a number nor \"pixels\"",
                           span_of("scale"), help="`scale = 100` (MiniGPT-v2: integers 0..100 of the image), "
                           "`scale = 1000`, or `scale = \"pixels\"` (Qwen2.5-VL: pixels of the resized input)")
        elif not 1 <= self.scale <= 100_000:
            sink.error("E0296", f"box scale {self.scale}: a relative scale runs from 1 to 100,000",
                       span_of("scale"), help="MiniGPT-v2 writes integers 0..100: `scale = 100`")


def boxes_from_call(v: Any) -> Any:
    """`patch_index(...)` / `coordinates(...)` as the dict pydantic validates; anything else is refused by
    naming both forms."""
    if isinstance(v, CallValue):
        if v.name == "patch_index" and not v.args:
            return {"kind": "patch_index", **v.kw()}
        if v.name == "coordinates" and not v.args:
            return {"kind": "coordinates", **v.kw()}
        raise ValueError("expected `patch_index(bins = 32)` or `coordinates(format = \"...\", scale = 100)`")
    return v


Boxes = PatchIndexBoxes | CoordinateBoxes

"""Text <-> boxes for the box format a spec declares (`boxes = patch_index(...)` / `coordinates(...)`).

Everything here speaks the ORIGINAL image's pixels: a grounding answer is only useful to a caller in the
picture it sent, not in the processor's resized copy. What a written number means, per format:

- `patch_index(bins = N)`: cells of an N x N grid over the whole image (KOSMOS-2 resizes to a square
  without cropping, so a fraction of the input is the same fraction of the original). Two cells give the
  box exactly as KOSMOS-2's processor reads them: the cells' outer corners when the two cells share a
  row or a column (or are one cell), the cells' centres otherwise.
- `coordinates(scale = S)`: integers 0..S as a fraction of the image's width (x) and height (y).
- `coordinates(scale = "pixels")`: pixels of the image as the processor resized it (`input_size`); they
  are scaled back by original / resized per axis.

Reading never raises on a model's output: a half-written or out-of-range box is skipped.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from vlmspec.compiler.schema.boxes import Boxes, CoordinateBoxes, PatchIndexBoxes

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Box:
    """One box in the original image's pixels; `label` is the phrase that named it, if the text had one."""

    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def corners(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


def iou(a: tuple[float, float, float, float] | Box, b: tuple[float, float, float, float] | Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either has no area."""
    ax1, ay1, ax2, ay2 = a.corners if isinstance(a, Box) else a
    bx1, by1, bx2, by2 = b.corners if isinstance(b, Box) else b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


# ---- patch_index (KOSMOS-2) ------------------------------------------------------------------------------

_OBJECT = re.compile(r"(?:<phrase>([^<]*)</phrase>)?<object>((?:<patch_index_\d+><patch_index_\d+>"
                     r"</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>")
_CELL = re.compile(r"<patch_index_(\d+)>")


def cells_to_fractions(first: int, last: int, bins: int) -> tuple[float, float, float, float]:
    """Two cell numbers as fractions of the image (KOSMOS-2's reading, see the module docstring)."""
    cell = 1.0 / bins
    fx, fy, lx, ly = first % bins, first // bins, last % bins, last // bins
    if first == last or fx == lx or fy == ly:
        return fx * cell, fy * cell, lx * cell + cell, ly * cell + cell
    return fx * cell + cell / 2, fy * cell + cell / 2, lx * cell + cell / 2, ly * cell + cell / 2


def fractions_to_cells(box: tuple[float, float, float, float], bins: int) -> tuple[int, int]:
    """The top-left cell holding (x1, y1) and the bottom-right cell holding (x2, y2) (a right or bottom edge on
    a cell line belongs to the cell before it), clamped to the grid."""
    x1, y1, x2, y2 = box

    def clamp(v: int) -> int:
        return min(bins - 1, max(0, v))
    fx, fy = clamp(math.floor(x1 * bins)), clamp(math.floor(y1 * bins))
    lx, ly = clamp(math.ceil(x2 * bins - 1)), clamp(math.ceil(y2 * bins - 1))
    return fy * bins + fx, ly * bins + lx


def _parse_patch_index(text: str, decl: PatchIndexBoxes) -> list[tuple[str | None, tuple[float, ...]]]:
    out: list[tuple[str | None, tuple[float, ...]]] = []
    cells = decl.bins * decl.bins
    for m in _OBJECT.finditer(text):
        label = m.group(1).strip() if m.group(1) is not None else None
        for pair in m.group(2).split("</delimiter_of_multi_objects/>"):
            a, b = (int(n) for n in _CELL.findall(pair))
            if a < cells and b < cells:  # a cell off the grid is a malformed box: skipped
                out.append((label, cells_to_fractions(a, b, decl.bins)))
    return out


def _format_patch_index(box: Box, decl: PatchIndexBoxes, size: Size) -> str:
    w, h = size
    first, last = fractions_to_cells((box.x1 / w, box.y1 / h, box.x2 / w, box.y2 / h), decl.bins)
    obj = f"<object><patch_index_{first:04d}><patch_index_{last:04d}></object>"
    return f"<phrase>{box.label}</phrase>{obj}" if box.label else obj


# ---- coordinates (MiniGPT-v2, Qwen2.5-VL) ----------------------------------------------------------------

def _template_regex(decl: CoordinateBoxes) -> re.Pattern[str]:
    """The format as a regex: literal text escaped, each placeholder a (signed, decimal) number group."""
    parts: list[str] = []
    pos = 0
    for m in re.finditer(r"\{(x1|y1|x2|y2)\}", decl.format):
        parts.append(re.escape(decl.format[pos:m.start()]))
        parts.append(rf"\s*(?P<{m.group(1)}>-?\d+(?:\.\d+)?)\s*")
        pos = m.end()
    parts.append(re.escape(decl.format[pos:]))
    return re.compile("".join(parts))


def _unit(decl: CoordinateBoxes, image_size: Size, input_size: Size | None) -> tuple[float, float]:
    """Original pixels per written unit, per axis."""
    w, h = image_size
    if decl.scale == "pixels":
        iw, ih = input_size or image_size
        return w / iw, h / ih
    return w / float(decl.scale), h / float(decl.scale)


def _parse_coordinates(text: str, decl: CoordinateBoxes, image_size: Size,
                       input_size: Size | None) -> list[tuple[str | None, tuple[float, ...]]]:
    ux, uy = _unit(decl, image_size, input_size)
    limit_x = (input_size or image_size)[0] if decl.scale == "pixels" else float(decl.scale)
    limit_y = (input_size or image_size)[1] if decl.scale == "pixels" else float(decl.scale)
    out: list[tuple[str | None, tuple[float, ...]]] = []
    for m in _template_regex(decl).finditer(text):
        x1, y1, x2, y2 = (float(m.group(k)) for k in ("x1", "y1", "x2", "y2"))
        if not (0 <= x1 <= x2 <= limit_x and 0 <= y1 <= y2 <= limit_y):
            continue  # off the image or corners swapped: not a box the model meant
        label = _label_before(text, m.start())
        out.append((label, (x1 * ux, y1 * uy, x2 * ux, y2 * uy)))
    return out


def _label_before(text: str, at: int) -> str | None:
    """MiniGPT-v2 names a grounded phrase `<p>red circle</p>` just before its box."""
    m = re.search(r"<p>([^<]*)</p>\s*$", text[:at])
    return m.group(1).strip() if m else None


def _format_number(v: float) -> str:
    return str(int(round(v)))


def _format_coordinates(box: Box, decl: CoordinateBoxes, image_size: Size, input_size: Size | None) -> str:
    ux, uy = _unit(decl, image_size, input_size)
    limit_x = (input_size or image_size)[0] if decl.scale == "pixels" else float(decl.scale)
    limit_y = (input_size or image_size)[1] if decl.scale == "pixels" else float(decl.scale)
    vals = {"x1": min(limit_x, max(0.0, box.x1 / ux)), "y1": min(limit_y, max(0.0, box.y1 / uy)),
            "x2": min(limit_x, max(0.0, box.x2 / ux)), "y2": min(limit_y, max(0.0, box.y2 / uy))}
    return re.sub(r"\{(x1|y1|x2|y2)\}", lambda m: _format_number(vals[m.group(1)]), decl.format)


# ---- the two entry points --------------------------------------------------------------------------------

def parse_boxes(text: str, decl: Boxes, image_size: Size, input_size: Size | None = None) -> list[Box]:
    """Every well-formed box in `text`, in order, in the original image's pixels. `image_size` is the
    original (width, height); `input_size` the processor's resized (width, height), read only by
    `scale = "pixels"` (default: the original, i.e. no resize)."""
    w, h = image_size
    if isinstance(decl, PatchIndexBoxes):
        found = [(label, (x1 * w, y1 * h, x2 * w, y2 * h)) for label, (x1, y1, x2, y2) in _parse_patch_index(text, decl)]
    else:
        found = _parse_coordinates(text, decl, image_size, input_size)
    return [Box(label, *corners) for label, corners in found]


def format_box(box: Box, decl: Boxes, image_size: Size, input_size: Size | None = None) -> str:
    """`box` (original pixels) as the model writes it: a training target. Corners are clamped to the image."""
    if isinstance(decl, PatchIndexBoxes):
        return _format_patch_index(box, decl, image_size)
    return _format_coordinates(box, decl, image_size, input_size)


def box_token_budget(decl: Boxes, tokenizer: object, margin: int = 16) -> int:
    """New tokens enough to write one box in the declared format and name it: the box with every number at its
    most digits (the scale's, or five for pixels), tokenized, plus `margin` for a phrase. A held-out grounding
    evaluation during training cuts answers at this, so a box is never scored as missing because the answer
    was cut inside it."""
    if isinstance(decl, CoordinateBoxes):
        digits = 5 if decl.scale == "pixels" else len(str(decl.scale))
        text = re.sub(r"\{(x1|y1|x2|y2)\}", "8" * digits, decl.format)
    else:  # the cell tokens have a fixed width
        text = _format_patch_index(Box(None, 0.0, 0.0, 1.0, 1.0), decl, (1, 1))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + margin  # type: ignore[operator]


def input_size(processor: object, image_size: Size) -> Size | None:
    """The (width, height) the processor resizes an image of `image_size` to, which `scale = "pixels"` counts
    in: a dynamic-resolution encoder's `smart_resize`, a square encoder's side; None when the input is
    tiled (no one pixel grid to count in: the original's is used)."""
    from vlmspec.runtime.inputs.images import NativeImageTransform, smart_resize

    native = getattr(processor, "native", None)
    transform = native if native is not None else getattr(processor, "transform", None)
    if isinstance(transform, NativeImageTransform):
        h, w = smart_resize(image_size[1], image_size[0], transform.factor, transform.min_pixels,
                            transform.max_pixels)
        return (w, h)
    side = getattr(transform, "size", None)
    if type(transform).__name__ == "ImageTransform" and isinstance(side, int):
        return (side, side)
    return None


def print_answers(session: object, texts: list[str], images: list, boxes: bool, as_json: bool, out: object) -> None:
    """`vlm generate --boxes [--json]`: each answer, then its boxes as a table (or all of it as JSON). A model
    that declares no box format cannot be read for boxes (E0627)."""
    import json

    from vlmspec.diagnostics import user_error
    from vlmspec.runtime.inputs.images import open_image

    decl = session.analysis.ir.settings.boxes  # type: ignore[attr-defined]
    if boxes and decl is None:
        raise user_error("E0627", f"model `{session.name}` declares no box format, so `--boxes` cannot read "  # type: ignore[attr-defined]
                         "its answers", help="add `boxes = coordinates(format = \"{<{x1}><{y1}><{x2}><{y2}>}\", "
                         "scale = 100)` (MiniGPT-v2) or `boxes = patch_index(bins = 32)` (KOSMOS-2) to the spec")
    if boxes and not images:
        raise user_error("E0628", "`--boxes` needs `--image`: a box is read in the image's pixels")
    processor = session.require_processor() if boxes else None  # type: ignore[attr-defined]
    results = []
    for i, text in enumerate(texts):
        row: dict = {"text": text}
        if boxes:
            img = open_image(str(images[i]))
            size = (img.width, img.height)
            row["image"] = str(images[i])
            row["boxes"] = [b.as_dict() for b in parse_boxes(text, decl, size, input_size(processor, size))]
        results.append(row)
    if as_json:
        out.print_json(json.dumps(results if len(results) > 1 else results[0]))  # type: ignore[attr-defined]
        return
    from rich.table import Table

    for row in results:
        out.print(row["text"], markup=False)  # type: ignore[attr-defined]
        if not boxes:
            continue
        table = Table("label", "x1", "y1", "x2", "y2", title=f"boxes in {row['image']}")
        for b in row["boxes"]:
            table.add_row(b["label"] or "", *(f"{b[k]:.1f}" for k in ("x1", "y1", "x2", "y2")))
        out.print(table if row["boxes"] else "(no box)")  # type: ignore[attr-defined]


def message_boxes(session: object, text: str, image: object) -> list[dict] | None:
    """The server's `boxes` field of a chat completion: None when the model declares no box format (the field
    is left out), else the boxes in `text` in the sent image's pixels ([] without a readable image, since a box
    has no pixels to be in)."""
    import io

    from PIL import Image, UnidentifiedImageError

    decl = session.analysis.ir.settings.boxes  # type: ignore[attr-defined]
    if decl is None:
        return None
    if not isinstance(image, bytes | bytearray):
        return []
    try:
        with Image.open(io.BytesIO(image)) as img:
            size = (img.width, img.height)
    except (UnidentifiedImageError, OSError):
        return []
    processor = session.require_processor()  # type: ignore[attr-defined]
    return [b.as_dict() for b in parse_boxes(text, decl, size, input_size(processor, size))]


def box_turns(sample: object, processor: object) -> list[tuple[str, str]]:
    """A grounding record's turns with `{box}` in its answers written as the spec's `boxes` declares (the
    record's box is in image pixels, so one data file trains any grounding model). A box record for a
    model that declares no box format is refused (E0629): it would train on the literal `{box}`."""
    from vlmspec.diagnostics import user_error
    from vlmspec.runtime.inputs.images import open_image

    decl = processor.analysis.ir.settings.boxes  # type: ignore[attr-defined]
    if decl is None:
        raise user_error("E0629", f"{sample.where}: a record with a `box`, and the model declares no box format "  # type: ignore[attr-defined]
                         "to write it in", help="add `boxes = coordinates(format = \"{<{x1}><{y1}><{x2}><{y2}>}\", "
                         "scale = 100)` (MiniGPT-v2) or `boxes = patch_index(bins = 32)` (KOSMOS-2) to the spec")
    with open_image(str(sample.image)) as img:  # type: ignore[attr-defined]
        size = (img.width, img.height)
    text = format_box(Box(None, *sample.box), decl, size, input_size(processor, size))  # type: ignore[attr-defined]
    return [(q, a.replace("{box}", text)) for q, a in sample.turns]  # type: ignore[attr-defined]

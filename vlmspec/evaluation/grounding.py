"""`vlm eval --task grounding`: referring-expression grounding scored as RefCOCO is.

Records are JSONL, `{"image": "a.png", "question": "[refer] the red circle", "box": [x1, y1, x2, y2]}` with
the box in the image's own pixels. The model answers each question; the FIRST box its text holds, read in
the format its spec declares (`boxes = ...`, vlmspec/runtime/grounding.py), is the prediction. As in the
RefCOCO/+/g papers a prediction is right when its IoU with the reference is at least 0.5; an answer with no
readable box is a miss (IoU 0). Reported: `grounding_accuracy` (percent right) and `mean_iou` (over all
questions, misses as 0), plus `no_box` (how many answers held no box).

Kept apart from `formats.py`: a box reference is neither answers nor captions, and the task needs the
model's box declaration, which only a model run has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.formats import too_many_bad
from vlmspec.runtime.grounding import Box, input_size, iou, parse_boxes
from vlmspec.runtime.inputs.data import BadRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vlmspec.compiler.schema.boxes import Boxes
    from vlmspec.runtime.session import Session

IOU_THRESHOLD = 0.5


@dataclass(slots=True)
class Referral:
    id: int | str
    image: Path
    question: str
    box: tuple[float, float, float, float]
    where: str


@dataclass(slots=True)
class GroundingSet:
    path: str
    samples: list[Referral] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def check(self, max_bad: int) -> None:
        if len(self.bad) > max_bad:
            raise too_many_bad(self.bad, self.path, max_bad)


def read_grounding(data: str | Path, images: str | Path | None = None) -> GroundingSet:
    """The JSONL records; a record without a readable image, a question, or a box with x1 < x2 and y1 < y2
    is a bad record (counted against --max-bad), never a crash."""
    path = Path(data)
    if not path.is_file():
        raise user_error("E0551", f"no such file: {path}")
    base = Path(images) if images else path.parent
    gs = GroundingSet(str(path))
    for n, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            gs.bad.append(BadRecord(where, f"invalid JSON: {e.msg}"))
            continue
        problem = _problem(rec, base)
        if problem:
            gs.bad.append(BadRecord(where, problem))
            continue
        gs.samples.append(Referral(rec.get("id", n), base / rec["image"], rec["question"],
                                   tuple(float(v) for v in rec["box"]), where))
    return gs


def _problem(rec: Any, base: Path) -> str | None:
    if not isinstance(rec, dict):
        return "a record must be a JSON object"
    if not isinstance(rec.get("image"), str) or not (base / rec["image"]).is_file():
        return f"image not found: {base / str(rec.get('image'))}"
    if not isinstance(rec.get("question"), str) or not rec["question"].strip():
        return "no `question` (the referring expression)"
    box = rec.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                             for v in box) and box[0] < box[2] and box[1] < box[3]):
        return "`box` must be [x1, y1, x2, y2] in image pixels with x1 < x2 and y1 < y2"
    return None


def grounding_scores(predicted: Sequence[Box | None], references: Sequence[tuple[float, float, float, float]]
                     ) -> tuple[dict[str, Any], list[float]]:
    """Accuracy at IoU >= 0.5 (percent), mean IoU, and each question's IoU (a missing box scores 0)."""
    ious = [iou(p, r) if p is not None else 0.0 for p, r in zip(predicted, references, strict=True)]
    n = len(ious)
    metrics = {"grounding_accuracy": 100.0 * sum(v >= IOU_THRESHOLD for v in ious) / n if n else 0.0,
               "mean_iou": sum(ious) / n if n else 0.0, "questions": n,
               "no_box": sum(p is None for p in predicted)}
    return metrics, ious


def declared_boxes(session: Session) -> Boxes:
    """The model's `boxes = ...`; without one its text cannot be read as boxes (E0627)."""
    decl = session.analysis.ir.settings.boxes
    if decl is None:
        raise user_error("E0627", f"model `{session.name}` declares no box format, so its answers cannot be read "
                         "as boxes", help="add `boxes = coordinates(format = \"{<{x1}><{y1}><{x2}><{y2}>}\", "
                         "scale = 100)` (MiniGPT-v2) or `boxes = patch_index(bins = 32)` (KOSMOS-2) to the spec")
    return decl


def run_grounding(session: Session, data: str, images: str | None, max_new_tokens: int, max_bad: int,
                  progress: bool, limit: int | None, batch_size: int) -> tuple[GroundingSet, dict[str, Any],
                                                                               list[dict[str, Any]]]:
    """Answer every referring expression, read the first box of each answer, score."""
    from vlmspec.evaluation.batching import batches, progress_bar
    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.inputs.images import open_image

    decl = declared_boxes(session)
    gs = read_grounding(data, images)
    if limit is not None:
        gs.samples = gs.samples[:limit]
    gs.check(max_bad)
    if not gs.samples:
        raise user_error("E0551", f"{data} has no usable grounding records")
    processor = session.require_processor()
    rows: list[dict[str, Any]] = []
    predicted: list[Box | None] = []
    with progress_bar(progress, len(gs.samples), "eval grounding") as advance:
        for chunk in batches(gs.samples, batch_size):
            imgs = [open_image(s.image) for s in chunk]
            texts = answer(session, [s.question for s in chunk], imgs, max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=len(chunk))
            for s, img, text in zip(chunk, imgs, texts, strict=True):
                size = (img.width, img.height)
                boxes = parse_boxes(text, decl, size, input_size(processor, size))
                predicted.append(boxes[0] if boxes else None)
                rows.append({"id": s.id, "image": str(s.image), "question": s.question, "prediction": text,
                             "box": list(boxes[0].corners) if boxes else None, "reference": list(s.box)})
            advance(len(chunk))
    metrics, ious = grounding_scores(predicted, [s.box for s in gs.samples])
    for row, v in zip(rows, ious, strict=True):
        row["iou"] = v
    return gs, metrics, rows

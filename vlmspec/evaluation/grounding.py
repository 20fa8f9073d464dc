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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.formats import RecordSet, jsonl_records
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


GroundingSet = RecordSet[Referral]


def read_grounding(data: str | Path, images: str | Path | None = None) -> GroundingSet:
    """The JSONL records; a record without a readable image, a question, or a box with x1 < x2 and y1 < y2
    is a bad record (counted against --max-bad), never a crash."""
    path = Path(data)
    base = Path(images) if images else path.parent
    gs = GroundingSet(str(path))
    for where, n, rec in jsonl_records(path, gs.bad):
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
    gs.ready("grounding", limit, max_bad)
    processor = session.require_processor()
    answers: list[tuple[str, Box | None]] = []
    with progress_bar(progress, len(gs.samples), "eval grounding") as advance:
        for chunk in batches(gs.samples, batch_size):
            imgs = [open_image(s.image) for s in chunk]
            texts = answer(session, [s.question for s in chunk], imgs, max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=len(chunk))
            for img, text in zip(imgs, texts, strict=True):
                size = (img.width, img.height)
                boxes = parse_boxes(text, decl, size, input_size(processor, size))
                answers.append((text, boxes[0] if boxes else None))
            advance(len(chunk))
    return gs, *_scored(gs.samples, answers)


def _scored(samples: list[Referral], answers: list[tuple[str, Box | None]]
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one row per question) from each question's (answer text, first box)."""
    metrics, ious = grounding_scores([box for _, box in answers], [s.box for s in samples])
    rows = [{"id": s.id, "image": str(s.image), "question": s.question, "prediction": text,
             "box": list(box.corners) if box else None, "reference": list(s.box), "iou": v}
            for s, (text, box), v in zip(samples, answers, ious, strict=True)]
    return metrics, rows


def run_grounding_server(client: Any, data: str, images: str | None, max_new_tokens: int, max_bad: int,
                         progress: bool, limit: int | None, concurrency: int
                         ) -> tuple[GroundingSet, dict[str, Any], list[dict[str, Any]]]:
    """`run_grounding` against a server: each question with its image as a PNG, greedy, and the first box of the
    message's `boxes` field (which `vlm serve` fills in from the spec's `boxes` declaration, in the sent image's
    pixels), scored the same way. A server that sends no `boxes` field cannot be scored (E0630): the client has
    no spec to read the answer's text with."""
    from concurrent.futures import ThreadPoolExecutor

    from vlmspec.evaluation.batching import batches, png_bytes, progress_bar

    gs = read_grounding(data, images)
    gs.ready("grounding", limit, max_bad)

    def ask(s: Referral) -> tuple[str, list[dict[str, Any]] | None]:
        return client.complete_boxes(s.question, png_bytes(s.image), max_new_tokens)

    answers: list[tuple[str, Box | None]] = []
    with progress_bar(progress, len(gs.samples), "eval grounding (server)") as advance, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for chunk in batches(gs.samples, max(1, concurrency)):
            for text, boxes in pool.map(ask, chunk):
                if boxes is None:
                    raise user_error("E0630", f"{client.endpoint} answered without a `boxes` field, so its answers' "
                                     "boxes cannot be read (the format is in the model's spec, which the client does "
                                     "not have)", help="serve the model with `vlm serve` (its spec declares `boxes = "
                                     "...`), or evaluate the model folder: `vlm eval MODEL --task grounding`")
                box = Box(boxes[0].get("label"), *(float(boxes[0][k]) for k in ("x1", "y1", "x2", "y2"))) \
                    if boxes else None
                answers.append((text, box))
            advance(len(chunk))
    return gs, *_scored(gs.samples, answers)

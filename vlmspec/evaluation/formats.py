"""Evaluation data in the formats the benchmarks ship, with bad records reported, not fatal.

- VQAv2: a questions file `{"questions": [{"question_id", "image_id", "question"}], "data_subtype": ...}`
  and an annotations file `{"annotations": [{"question_id", "answers": [{"answer": ...}], "answer_type"}]}`.
  Either file may be given; the other is found beside it (`..._questions.json` <-> `..._annotations.json`,
  or VQAv2's own `v2_OpenEnded_mscoco_<split>_questions.json` <-> `v2_mscoco_<split>_annotations.json`),
  or passed explicitly. One JSON holding both lists works too. Images are found by a pattern with
  `{image_id}` and `{subtype}` fields; by default COCO's `COCO_<subtype>_<id:012d>.jpg`, then `<id:012d>.jpg`.
- COCO captions: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`.
- JSONL, one record a line: `{"image", "question", "answers"}` for VQA (answers: strings or
  `{"answer": ...}` objects; a single `"answer"` string works too; optional `answer_type`),
  `{"image", "captions"}` (or `"caption"`) for captioning and retrieval. A sample's id is the record's
  `question_id` / `id` / `image_id` when it has one, else its line number.

A record that cannot be used (invalid JSON, missing fields, no answers, an image file that is not there)
becomes a `BadRecord` with its file and line (and its index in the JSON list, since the official JSON
files are one long line), and is skipped; `EvalSet.check(max_bad)` refuses the set when there are more
than the user allowed. Images are only checked to exist here: decoding 40k COCO images up front would
take minutes, so an unreadable one is found, and counted as bad, when the runner opens it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.data import BadRecord

Task = Literal["vqa", "caption", "retrieval"]
TASKS: tuple[str, ...] = ("vqa", "caption", "retrieval")
SHOWN_BAD = 5
T = TypeVar("T")


@dataclass(slots=True)
class EvalSample:
    """One question (VQA) or one image with its reference captions (captioning, retrieval)."""

    id: int | str
    image: Path
    where: str
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    answer_type: str | None = None


@dataclass(slots=True)
class EvalSet:
    task: str
    path: str
    samples: list[EvalSample] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def check(self, max_bad: int) -> None:
        """Refuse a set with more bad records than the user allowed, listing the first ones."""
        if len(self.bad) > max_bad:
            raise too_many_bad(self.bad, self.path, max_bad)


@dataclass(slots=True)
class RecordSet(Generic[T]):
    """The usable records of a task's data file (`T`: the task's record type) and the bad ones, with their
    lines; the tasks that need more than `EvalSample` (video QA, grounding) read into one of these."""

    path: str
    samples: list[T] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def check(self, max_bad: int) -> None:
        if len(self.bad) > max_bad:
            raise too_many_bad(self.bad, self.path, max_bad)

    def ready(self, task: str, limit: int | None, max_bad: int) -> None:
        """Keep the first `limit` records (a quick look); refuse a set past `max_bad` bad records, or with none
        left to evaluate, before any model work."""
        if limit is not None:
            self.samples = self.samples[:limit]
        self.check(max_bad)
        if not self.samples:
            raise user_error("E0551", f"{self.path} has no usable {task} records")


#: the record field that says which task a JSONL file is for (`vlm data synth` writes one file per task)
TASK_FIELDS = (("video", "video_qa"), ("box", "grounding"), ("label", "zero_shot"), ("captions", "retrieval"))


def task_of_records(path: str | Path) -> str:
    """The task a JSONL file's first record asks for: `video_qa` (a `video`), `grounding` (a `box`), `zero_shot`
    (a `label`), `retrieval` (`captions`), else `vqa`. An unreadable file reads as `vqa`: the task's own reader
    then reports the problem with its line."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        rec = json.loads(first)
    except (OSError, ValueError):
        return "vqa"
    keys = set(rec) if isinstance(rec, dict) else set()
    return next((task for key, task in TASK_FIELDS if key in keys), "vqa")


def too_many_bad(bad: list[BadRecord], path: str, max_bad: int) -> Exception:
    shown = "; ".join(f"{b.where}: {b.reason}" for b in bad[:SHOWN_BAD])
    more = f" (and {len(bad) - SHOWN_BAD} more)" if len(bad) > SHOWN_BAD else ""
    return user_error("E0550", f"{len(bad)} bad records in {path} (limit --max-bad {max_bad}): {shown}{more}",
                      help="fix the records, or raise --max-bad to skip them")


# ---------------------------------------------------------------- JSON with line numbers
class _Lines:
    """Line numbers of offsets met in increasing order, counted incrementally (files reach 100s of MB)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


_WS = re.compile(r"[ \t\r\n]*")


def _top_level(text: str, path: str, lists: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[tuple[int, int, Any]]]]:
    """Parse a JSON object; the members named in `lists`, when arrays, come back as (line, index, value).

    A bad element must not hide the others, so arrays are read element by element; the rest of the
    object is read normally.
    """
    dec = json.JSONDecoder()
    lines = _Lines(text)
    scalars: dict[str, Any] = {}
    arrays: dict[str, list[tuple[int, int, Any]]] = {}

    def fail(i: int, msg: str) -> Exception:
        return user_error("E0551", f"{path}:{lines.at(i) if i >= lines.pos else lines.line}: {msg}")

    def decode(i: int) -> tuple[Any, int]:
        try:
            return dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise user_error("E0551", f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None

    i = _WS.match(text, 0).end()
    if not text.startswith("{", i):
        raise fail(i, "expected a JSON object (`{...}`)")
    i = _WS.match(text, i + 1).end()
    if text.startswith("}", i):
        return scalars, arrays
    while True:
        key, i = decode(i)
        i = _WS.match(text, i).end()
        if not isinstance(key, str) or not text.startswith(":", i):
            raise fail(i, "expected `\"key\": value` in the top-level object")
        i = _WS.match(text, i + 1).end()
        if key in lists and text.startswith("[", i):
            items: list[tuple[int, int, Any]] = []
            i = _WS.match(text, i + 1).end()
            if text.startswith("]", i):
                i += 1
            else:
                while True:
                    value, end = decode(i)
                    items.append((lines.at(i), len(items), value))
                    i = _WS.match(text, end).end()
                    if text.startswith("]", i):
                        i += 1
                        break
                    if not text.startswith(",", i):
                        raise fail(i, f"expected `,` or `]` in the `{key}` list")
                    i = _WS.match(text, i + 1).end()
            arrays[key] = items
        else:
            scalars[key], i = decode(i)
        i = _WS.match(text, i).end()
        if text.startswith("}", i):
            return scalars, arrays
        if not text.startswith(",", i):
            raise fail(i, "expected `,` or `}` in the top-level object")
        i = _WS.match(text, i + 1).end()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise user_error("E0551", f"no such data file: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")   # tolerate a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise user_error("E0551", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _where(path: Path, line: int, key: str | None = None, index: int | None = None) -> str:
    return f"{path}:{line}" + (f" ({key}[{index}])" if key is not None else "")


def jsonl_records(path: Path, bad: list[BadRecord]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(`file:line`, line, object) for each JSON object of a JSONL file; a line that is not one becomes a bad
    record, so one broken line never hides the rest. Every evaluation task's reader goes through here."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which are not line ends here.
    for n, raw in enumerate(_read_text(path).split("\n"), 1):
        if not raw.strip():
            continue
        where = _where(path, n)
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.append(BadRecord(where, f"invalid JSON: {e.msg}"))
            continue
        if not isinstance(rec, dict):
            bad.append(BadRecord(where, "a record must be a JSON object"))
            continue
        yield where, n, rec


def _image(value: Any, base: Path) -> tuple[Path | None, str | None]:
    if not isinstance(value, str) or not value:
        return None, "no `image`"
    p = base / value
    return (p, None) if p.is_file() else (None, f"image not found: {p}")


def _strings(value: Any) -> list[str] | None:
    """A list of non-empty strings, also from `[{"answer": ...}]` objects; None when malformed."""
    if not isinstance(value, list):
        return None
    out = []
    for v in value:
        v = v.get("answer") if isinstance(v, dict) else v
        if not isinstance(v, str):
            return None
        out.append(v)
    return out


# ---------------------------------------------------------------- VQA
def _read_vqa_jsonl(path: Path, base: Path) -> EvalSet:
    es = EvalSet("vqa", str(path))
    for where, n, rec in jsonl_records(path, es.bad):
        question = rec.get("question")
        answers = _strings(rec["answers"]) if "answers" in rec else (
            [rec["answer"]] if isinstance(rec.get("answer"), str) else None)
        image, reason = _image(rec.get("image"), base)
        if not isinstance(question, str) or not question.strip():
            reason = "a VQA record needs a `question` string"
        elif answers is None:
            reason = "a VQA record needs `answers`: a list of strings (or of {\"answer\": ...})"
        elif not answers:
            reason = "no answers"
        if reason is not None or image is None:
            es.bad.append(BadRecord(where, reason or "no `image`"))
            continue
        sid = rec.get("question_id", rec.get("id", n))
        es.samples.append(EvalSample(sid if isinstance(sid, int | str) else str(sid), image, where,
                                     question=question, answers=answers,
                                     answer_type=rec.get("answer_type") if isinstance(rec.get("answer_type"), str)
                                     else None))
    return es


def _vqa_partner(path: Path, has: str) -> Path | None:
    """The annotations file beside a questions file, or the other way round, by VQAv2's names."""
    name = path.name
    if has == "questions":
        candidates = [name.replace("questions", "annotations"),
                      re.sub(r"^(v2_)?OpenEnded_(\w+?)_(\w+)_questions", r"\1\2_\3_annotations", name)]
    else:
        candidates = [name.replace("annotations", "questions"),
                      re.sub(r"^(v2_)?(\w+?)_(\w+)_annotations", r"\1OpenEnded_\2_\3_questions", name)]
    for c in candidates:
        if c != name and (path.parent / c).is_file():
            return path.parent / c
    return None


def _read_vqav2(path: Path, scalars: dict[str, Any], arrays: dict[str, list[tuple[int, int, Any]]],
                base: Path, annotations: str | Path | None, image_pattern: str | None) -> EvalSet:
    q_path, a_path = path, path
    if "questions" not in arrays:                     # given the annotations: find the questions
        other = Path(annotations) if annotations else _vqa_partner(path, "annotations")
        if other is None:
            raise user_error("E0551", f"{path} holds VQA annotations but no questions, and no questions file "
                             "was found beside it", help="pass the questions file as --data")
        q_path = other
        scalars, q_arrays = _top_level(_read_text(other), str(other), ("questions",))
        arrays = {**arrays, "questions": q_arrays.get("questions", [])}
    elif "annotations" not in arrays:                 # given the questions: find the annotations
        other = Path(annotations) if annotations else _vqa_partner(path, "questions")
        if other is None:
            raise user_error("E0551", f"{path} holds VQA questions but no annotations, and no annotations "
                             "file was found beside it", help="put the annotations file beside it")
        a_path = other
        _, a_arrays = _top_level(_read_text(other), str(other), ("annotations",))
        arrays = {**arrays, "annotations": a_arrays.get("annotations", [])}
    es = EvalSet("vqa", str(q_path))
    subtype = scalars.get("data_subtype") if isinstance(scalars.get("data_subtype"), str) else None
    patterns = [image_pattern] if image_pattern else (
        ([f"COCO_{subtype}_{{image_id:012d}}.jpg"] if subtype else []) + ["{image_id:012d}.jpg"])

    by_question: dict[Any, tuple[str, Any]] = {}
    for line, idx, ann in arrays["annotations"]:
        where = _where(a_path, line, "annotations", idx)
        if isinstance(ann, dict) and "question_id" in ann:
            by_question[ann["question_id"]] = (where, ann)
        else:
            es.bad.append(BadRecord(where, "an annotation needs a `question_id`"))
    for line, idx, q in arrays["questions"]:
        where = _where(q_path, line, "questions", idx)
        if not (isinstance(q, dict) and "question_id" in q and isinstance(q.get("question"), str)
                and isinstance(q.get("image_id"), int | str)):
            es.bad.append(BadRecord(where, "a question needs `question_id`, `image_id` and a `question` string"))
            continue
        found = by_question.get(q["question_id"])
        if found is None:
            es.bad.append(BadRecord(where, f"no annotation for question_id {q['question_id']}"))
            continue
        a_where, ann = found
        answers = _strings(ann.get("answers"))
        if not answers:
            es.bad.append(BadRecord(a_where, "an annotation needs a non-empty `answers` list of {\"answer\": ...}"))
            continue
        image, reason = _vqa_image(q["image_id"], base, patterns, subtype)
        if image is None:
            es.bad.append(BadRecord(where, reason or "no image"))
            continue
        kind = ann.get("answer_type")
        es.samples.append(EvalSample(q["question_id"], image, where, question=q["question"], answers=answers,
                                     answer_type=kind if isinstance(kind, str) else None))
    return es


def _vqa_image(image_id: Any, base: Path, patterns: list[str], subtype: str | None) -> tuple[Path | None, str | None]:
    tried = []
    for pattern in patterns:
        try:
            name = pattern.format(image_id=int(image_id) if str(image_id).isdigit() else image_id,
                                  subtype=subtype or "")
        except (KeyError, IndexError, AttributeError) as e:
            raise user_error("E0551", f"bad image pattern `{pattern}`: unknown field {e}",
                             help="use the fields {image_id} (e.g. {image_id:012d}) and {subtype}") from None
        except ValueError:
            tried.append(f"(image id {image_id!r} does not fit `{pattern}`)")
            continue
        p = base / name
        if p.is_file():
            return p, None
        tried.append(str(p))
    return None, "image not found: " + " or ".join(tried)


# ---------------------------------------------------------------- captions
def _read_captions_jsonl(path: Path, base: Path, task: str) -> EvalSet:
    es = EvalSet(task, str(path))
    for where, n, rec in jsonl_records(path, es.bad):
        caps = _strings(rec["captions"]) if "captions" in rec else (
            [rec["caption"]] if isinstance(rec.get("caption"), str) else None)
        image, reason = _image(rec.get("image"), base)
        if caps is None:
            reason = "a caption record needs `captions` (a list of strings) or `caption`"
        elif not [c for c in caps if c.strip()]:
            reason = "no caption"
        if reason is not None or image is None:
            es.bad.append(BadRecord(where, reason or "no `image`"))
            continue
        sid = rec.get("id", rec.get("image_id", n))
        es.samples.append(EvalSample(sid if isinstance(sid, int | str) else str(sid), image, where,
                                     references=[c for c in caps if c.strip()]))
    return es


def _read_coco_captions(path: Path, arrays: dict[str, list[tuple[int, int, Any]]], base: Path, task: str) -> EvalSet:
    es = EvalSet(task, str(path))
    captions: dict[Any, list[str]] = {}
    for line, idx, ann in arrays.get("annotations", []):
        if not (isinstance(ann, dict) and isinstance(ann.get("caption"), str) and "image_id" in ann):
            es.bad.append(BadRecord(_where(path, line, "annotations", idx), "an annotation needs `image_id` and a "
                                    "`caption` string"))
            continue
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    for line, idx, img in arrays["images"]:
        where = _where(path, line, "images", idx)
        if not (isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)):
            es.bad.append(BadRecord(where, "an image needs `id` and `file_name`"))
            continue
        refs = [c for c in captions.get(img["id"], []) if c.strip()]
        image, reason = _image(img["file_name"], base)
        if not refs:
            reason = f"no caption for image id {img['id']}"
        if reason is not None or image is None:
            es.bad.append(BadRecord(where, reason or "no image"))
            continue
        es.samples.append(EvalSample(img["id"], image, where, references=refs))
    return es


# ---------------------------------------------------------------- entry point
def read_eval_data(data: str | Path, task: str, images: str | Path | None = None,
                   annotations: str | Path | None = None, image_pattern: str | None = None) -> EvalSet:
    """The samples of an evaluation file for `task`, in whichever supported format it is.

    `images` is the folder image paths are relative to (default: the data file's folder).
    `annotations` names the VQAv2 file that pairs with `data` when it is not beside it by VQAv2's names;
    `image_pattern` overrides how VQAv2 image ids become file names.
    """
    if task not in TASKS:
        raise user_error("E0551", f"unknown task `{task}`", help="expected one of: `caption`, `retrieval`, `vqa`")
    path = Path(data)
    base = Path(images) if images else path.parent
    if path.suffix == ".jsonl":
        es = _read_vqa_jsonl(path, base) if task == "vqa" else _read_captions_jsonl(path, base, task)
    else:
        scalars, arrays = _top_level(_read_text(path), str(path), ("questions", "annotations", "images"))
        if task == "vqa":
            if "questions" not in arrays and not (arrays.get("annotations") and isinstance(
                    arrays["annotations"][0][2], dict) and "question_id" in arrays["annotations"][0][2]):
                raise user_error("E0551", f"{path} is not VQAv2 questions or annotations JSON",
                                 help="VQA data is VQAv2 JSON (`questions` / `annotations`) or JSONL "
                                 "(`{\"image\", \"question\", \"answers\"}`)")
            es = _read_vqav2(path, scalars, arrays, base, annotations, image_pattern)
        else:
            if "images" not in arrays:
                raise user_error("E0551", f"{path} is not COCO caption JSON (no `images` list)",
                                 help="caption data is COCO JSON (`images` + `annotations`) or JSONL "
                                 "(`{\"image\", \"captions\"}`)")
            es = _read_coco_captions(path, arrays, base, task)
    return es

"""Training and evaluation data in the formats users already have, with bad records reported, not fatal.

- LLaVA conversation JSON: a list of `{"image": ..., "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`.
- Image-caption JSONL: `{"image": ..., "caption": ...}` (or `"captions": [...]`, the first is used).
- Video conversations: a LLaVA record with `"video": ...` (a file or a folder of frames) instead of `"image"`,
  `<video>` (or the image placeholder) in its first question; the stage reads it with the spec's video reader.
- Audio conversations: a LLaVA record with `"audio": "clip.wav"` instead, `<audio>` (or the placeholder) in its
  first question; the stage reads it at the spec's audio front end (`vlmspec.runtime.train.audio_items`).

Every record that cannot be used (missing image, unreadable file, no `<image>` where the model needs
one, malformed turns) is counted and reported with its file and line, and skipped while the count
stays under `max_bad`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlmspec.diagnostics import user_error


@dataclass(slots=True)
class Sample:
    image: Path | None
    turns: list[tuple[str, str]]  # (question, answer) pairs; the first question carries the image
    where: str
    video: Path | None = None  # a `"video"` record's file or frame folder (then `image` is None)
    audio: Path | None = None  # an `"audio"` record's WAV file (then `image` and `video` are None)
    #: a grounding record's `"box": [x1, y1, x2, y2]` in the image's pixels; `{box}` in its answers is written
    #: in the spec's `boxes` format when the stage encodes it (vlmspec.runtime.grounding.box_turns)
    box: tuple[float, float, float, float] | None = None


@dataclass(slots=True)
class BadRecord:
    where: str
    reason: str


@dataclass(slots=True)
class Dataset:
    samples: list[Sample] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    path: str = ""

    def check(self, max_bad: int) -> None:
        """Refuse a dataset with more bad records than the user allowed, listing the first ones."""
        if len(self.bad) > max_bad:
            shown = "; ".join(f"{b.where}: {b.reason}" for b in self.bad[:3])
            raise user_error("E0520", f"{len(self.bad)} bad records in {self.path} (limit --max-bad {max_bad}): {shown}",
                             help="fix the records or raise --max-bad to skip them")


def _json_array_with_lines(text: str, path: str) -> list[tuple[int, Any]]:
    """Parse a JSON array, remembering the line each element starts on (for error messages)."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise user_error("E0521", f"{path} is not a JSON array of records")
    i += 1
    out = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            raise user_error("E0521", f"{path}: the JSON array is not closed")
        if text[i] == "]":
            return out
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise user_error("E0521", f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        out.append((text.count("\n", 0, i) + 1, value))
        i = end


def _image_ok(path: Path) -> str | None:
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return f"unreadable image: {path}"
    return None


def _video_ok(path: Path) -> str | None:
    """A video record's file or frame folder exists (it is decoded, and a truncated one refused, when the
    stage's data is encoded: `vlmspec.runtime.train.video_items`)."""
    if path.is_dir():
        return None if any(p.is_file() for p in path.iterdir()) else f"empty frame folder: {path}"
    return None if path.is_file() else f"video not found: {path}"


def _resolve_image(value: Any, images: Path) -> Path | None:
    return None if value in (None, "") else images / str(value)


def read_llava(path: str | Path, images: str | Path | None = None, needs_image: bool = True,
               image_token: str = "<image>") -> Dataset:
    p = Path(path)
    base = Path(images) if images else p.parent
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise user_error("E0521", f"cannot read {p}: {e.strerror}") from None
    ds = Dataset(path=str(p))
    for line, rec in _json_array_with_lines(text, str(p)):
        where = f"{p}:{line}"
        reason = None
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            ds.bad.append(BadRecord(where, "a record needs a `conversations` list"))
            continue
        convs = rec["conversations"]
        turns: list[tuple[str, str]] = []
        for j in range(0, len(convs) - 1, 2):
            h, g = convs[j], convs[j + 1]
            if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human"
                    and g.get("from") == "gpt" and isinstance(h.get("value"), str) and isinstance(g.get("value"), str)):
                reason = "turns must alternate human / gpt with string values"
                break
            turns.append((h["value"], g["value"]))
        if reason is None and not turns:
            reason = "no human / gpt turn"
        image = _resolve_image(rec.get("image"), base)
        video = _resolve_image(rec.get("video"), base)
        audio = _resolve_image(rec.get("audio"), base)
        if reason is None and audio is not None:  # an audio record: its placeholder is `<audio>` or the model's
            reason = "a record takes one of `image`, `video` or `audio`" if image is not None or video is not None \
                else None if audio.is_file() else f"audio not found: {audio}"
            if reason is None and "<audio>" not in turns[0][0] and image_token not in turns[0][0]:
                reason = f"the first question has no `<audio>` (or `{image_token}`) placeholder"
            if reason is None:
                turns[0] = (turns[0][0].replace("<audio>", "").strip(), turns[0][1])
        elif reason is None and video is not None:  # a video record: its placeholder is `<video>` or `<image>`
            reason = "a record takes an `image` or a `video`, not both" if image is not None else _video_ok(video)
            if reason is None and "<video>" not in turns[0][0] and image_token not in turns[0][0]:
                reason = f"the first question has no `<video>` (or `{image_token}`) placeholder"
            if reason is None:
                turns[0] = (turns[0][0].replace("<video>", "").replace(image_token, "").strip(), turns[0][1])
        elif reason is None and image is None and needs_image:
            reason = "no image, but the model needs one"
        elif reason is None and image is not None:
            reason = _image_ok(image)
            if reason is None and image_token not in turns[0][0]:
                reason = f"the first question has no `{image_token}` placeholder"
        box = rec.get("box")
        if reason is None and box is not None and not (
                isinstance(box, list) and len(box) == 4 and image is not None
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
                and box[0] < box[2] and box[1] < box[3]):
            reason = "`box` must be [x1, y1, x2, y2] in the image's pixels (x1 < x2, y1 < y2) of an image record"
        if reason is not None:
            ds.bad.append(BadRecord(where, reason))
            continue
        first_q = turns[0][0].replace(image_token, "").strip()
        turns[0] = (first_q, turns[0][1])
        ds.samples.append(Sample(image, turns, where, video, audio,
                                 tuple(float(v) for v in box) if box is not None else None))
    return ds


def read_captions(path: str | Path, images: str | Path | None = None) -> Dataset:
    p = Path(path)
    base = Path(images) if images else p.parent
    ds = Dataset(path=str(p))
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise user_error("E0521", f"cannot read {p}: {e.strerror}") from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            ds.bad.append(BadRecord(where, f"invalid JSON: {e.msg}"))
            continue
        cap = rec.get("caption") if isinstance(rec, dict) else None
        if cap is None and isinstance(rec, dict) and isinstance(rec.get("captions"), list) and rec["captions"]:
            cap = rec["captions"][0]
        if not isinstance(cap, str):
            ds.bad.append(BadRecord(where, "a record needs `image` and `caption`"))
            continue
        image = _resolve_image(rec.get("image"), base)
        reason = "no image" if image is None else _image_ok(image)
        if reason:
            ds.bad.append(BadRecord(where, reason))
            continue
        ds.samples.append(Sample(image, [("", cap)], where))
    return ds


def read_dataset(path: str | Path, fmt: str = "auto", images: str | Path | None = None,
                 needs_image: bool = True, image_token: str = "<image>") -> Dataset:
    p = Path(path)
    if not p.exists():
        raise user_error("E0521", f"no such data file: {p}")
    if fmt == "auto":
        fmt = "captions" if p.suffix == ".jsonl" else "llava"
    if fmt == "captions":
        return read_captions(p, images)
    return read_llava(p, images, needs_image, image_token)

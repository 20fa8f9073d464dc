"""A synthetic dataset that ships with vlmspec: coloured shapes on plain backgrounds.

It exists so the demo and the tests learn something real without downloading anything: a model
that answers "What color is the shape?" correctly on images it never saw has learned to see.
Files written (LLaVA's conversation format, plus JSONL for captions and VQA evaluation):

    images/NNNNNN.png   train.json   captions.jsonl   test.json   test_vqa.jsonl   test_captions.jsonl
    test_zero_shot.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmspec.fsutil import atomic_write_text

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"gray": (128, 128, 128), "black": (20, 20, 20), "white": (240, 240, 240)}
QUESTIONS = {
    "color": ["What color is the shape?", "Which color is the object?"],
    "shape": ["What shape is this?", "Which shape is in the image?"],
}


def draw_image(color: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.28, 0.4) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    _draw_shape(d, shape, cx, cy, r, COLORS[color])
    return img


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def synthesize(out: str | Path, n_train: int = 2000, n_test: int = 200, size: int = 64, seed: int = 0) -> dict:
    """Write the dataset to `out`; returns counts. Deterministic for a given seed."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    idx = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for _ in range(n):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            background = rng.choice(list(BACKGROUNDS))
            name = f"images/{idx:06d}.png"
            draw_image(color, shape, background, size, rng).save(root / name)
            splits[split].append({"id": f"{split}-{idx}", "image": name, "color": color, "shape": shape,
                                  "background": background})
            idx += 1

    def conversations(rec: dict, kind: str, q: str) -> dict:
        return {"id": f"{rec['id']}-{kind}", "image": rec["image"], "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": rec[kind]}]}

    train = [conversations(r, k, rng.choice(QUESTIONS[k])) for r in splits["train"] for k in ("color", "shape")]
    rng.shuffle(train)
    test = [conversations(r, k, QUESTIONS[k][0]) for r in splits["test"] for k in ("color", "shape")]
    atomic_write_text(root / "train.json", json.dumps(train, indent=1))
    atomic_write_text(root / "test.json", json.dumps(test, indent=1))
    atomic_write_text(root / "captions.jsonl", "".join(
        json.dumps({"image": r["image"], "caption": caption(r["color"], r["shape"], r["background"])}) + "\n"
        for r in splits["train"]))
    atomic_write_text(root / "test_captions.jsonl", "".join(
        json.dumps({"image": r["image"], "captions": [caption(r["color"], r["shape"], r["background"]),
                                                      f"a {r['shape']} that is {r['color']}"]}) + "\n"
        for r in splits["test"]))
    atomic_write_text(root / "test_vqa.jsonl", "".join(
        json.dumps({"image": r["image"], "question": QUESTIONS[k][0], "answers": [r[k]] * 10}) + "\n"
        for r in splits["test"] for k in ("color", "shape")))
    # zero-shot classification (`vlm eval --task zero_shot`): each held-out image's label is its colour
    atomic_write_text(root / "test_zero_shot.jsonl", "".join(
        json.dumps({"image": r["image"], "label": r["color"]}) + "\n" for r in splits["test"]))
    return {"train_images": n_train, "test_images": n_test, "train_conversations": len(train),
            "test_conversations": len(test)}


def corpus() -> list[str]:
    """Every string the synthetic data can contain, for training a matching tokenizer."""
    texts = [q for qs in QUESTIONS.values() for q in qs]
    texts += [caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    texts += list(COLORS) + list(SHAPES)
    texts += ["USER: ASSISTANT: Question: Answer: Describe the image.", "a photo of"]
    return texts * 20


# ---------------------------------------------------------------- videos: which way does the shape move?
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTION = "Which way does the shape move?"


def draw_frames(color: str, shape: str, background: str, direction: str, size: int, frames: int,
                rng: random.Random) -> list[Image.Image]:
    """A shape crossing most of the frame in `direction` over `frames` frames (from 80% to all of the room it
    has), from a random start that keeps it whole inside the frame. Nothing else moves, so the frames differ
    only by where the shape is. The shape is small (a radius of 12-18% of the frame) so that it has room to
    move far between frames: at 32 px and 8 frames 2.3-3.5 px a frame, a clear shift inside one 2-frame
    temporal patch of 8-px patches (with a larger shape moving 1-2.5 px a frame, the tiny Qwen2-VL's held-out
    accuracy after tests/train/test_video_learns.py's stages was 62-80%, against 100% now)."""
    dx, dy = DIRECTIONS[direction]
    r = max(2.0, rng.uniform(0.12, 0.18) * size)
    travel = rng.uniform(0.8, 1.0) * (size - 2 * r)
    lo, hi = r, size - r
    cx = rng.uniform(lo + travel, hi) if dx < 0 else rng.uniform(lo, hi - travel) if dx > 0 else rng.uniform(lo, hi)
    cy = rng.uniform(lo + travel, hi) if dy < 0 else rng.uniform(lo, hi - travel) if dy > 0 else rng.uniform(lo, hi)
    out = []
    for k in range(frames):
        f = k / max(1, frames - 1) * travel
        img = Image.new("RGB", (size, size), BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(img), shape, cx + dx * f, cy + dy * f, r, COLORS[color])
        out.append(img)
    return out


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def write_mp4(frames: list[Image.Image], path: Path, fps: int) -> None:
    """MPEG-4 Part 2 at `fps` frames a second with PyAV (E0600 without it); every frame a key frame, so a
    small clip decodes exactly frame for frame."""
    from vlmspec.runtime.inputs.video import _av

    av = _av()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2", "g": "1"}
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(img)))
        container.mux(stream.encode())


def synthesize_video(out: str | Path, n_train: int = 800, n_test: int = 80, size: int = 32, frames: int = 8,
                     fmt: str = "frames", fps: int = 2, seed: int = 0) -> dict:
    """Write moving-shape videos (`fmt`: `frames`, a folder of PNGs per video, or `mp4`) with training
    conversations asking which way the shape moves, held-out ones, and a multiple-choice video-QA file for
    `vlm eval --task video_qa`:

        videos/NNNNNN/ (or NNNNNN.mp4)   train_video.json   test_video.json   test_video_qa.jsonl

    The question lists the four directions as options, written as `vlm eval --task video_qa` asks it, so
    the held-out score measures the videos alone. Deterministic for a given seed."""
    from vlmspec.evaluation.video_qa import mc_prompt

    if fmt not in ("frames", "mp4"):
        raise ValueError(f"video format must be `frames` or `mp4`, not {fmt!r}")
    root = Path(out)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    options = list(DIRECTIONS)
    question = mc_prompt(VIDEO_QUESTION, options)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    idx = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            direction = options[k % len(options)] if split == "test" else rng.choice(options)
            # on black: a moving edge changes the pixels the same way (brighter ahead, darker behind) whatever
            # the colour, so the motion is what tells the directions apart
            color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), "black"
            clip = draw_frames(color, shape, background, direction, size, frames, rng)
            if fmt == "mp4":
                name = f"videos/{idx:06d}.mp4"
                write_mp4(clip, root / name, fps)
            else:
                name = f"videos/{idx:06d}"
                (root / name).mkdir(exist_ok=True)
                for j, img in enumerate(clip):
                    img.save(root / name / f"{j:04d}.png")
            splits[split].append({"id": f"{split}-{idx}", "video": name, "direction": direction})
            idx += 1

    def conversation(rec: dict) -> dict:
        return {"id": rec["id"], "video": rec["video"], "conversations": [
            {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": rec["direction"]}]}

    atomic_write_text(root / "train_video.json", json.dumps([conversation(r) for r in splits["train"]], indent=1))
    atomic_write_text(root / "test_video.json", json.dumps([conversation(r) for r in splits["test"]], indent=1))
    atomic_write_text(root / "test_video_qa.jsonl", "".join(
        json.dumps({"id": r["id"], "video": r["video"], "question": VIDEO_QUESTION, "options": options,
                    "answer": r["direction"]}) + "\n" for r in splits["test"]))
    return {"train_videos": n_train, "test_videos": n_test}

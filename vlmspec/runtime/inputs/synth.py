"""A synthetic dataset that ships with vlmspec: coloured shapes on plain backgrounds.

It exists so the demo and the tests learn something real without downloading anything: a model
that answers "What color is the shape?" correctly on images it never saw has learned to see.
Files written (LLaVA's conversation format, plus JSONL for captions and VQA evaluation):

    images/NNNNNN.png   train.json   captions.jsonl   test.json   test_vqa.jsonl   test_captions.jsonl
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
    fill = COLORS[color]
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
    return {"train_images": n_train, "test_images": n_test, "train_conversations": len(train),
            "test_conversations": len(test)}


def corpus() -> list[str]:
    """Every string the synthetic data can contain, for training a matching tokenizer."""
    texts = [q for qs in QUESTIONS.values() for q in qs]
    texts += [caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    texts += list(COLORS) + list(SHAPES)
    texts += ["USER: ASSISTANT: Question: Answer: Describe the image.", "a photo of"]
    return texts * 20

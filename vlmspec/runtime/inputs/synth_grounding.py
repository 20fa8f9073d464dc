"""Synthetic grounding data (`vlm data synth --grounding`): where is the red circle?

Each image holds a target shape and, on most images, a distractor of another colour and shape, at places
and sizes drawn at random, so the box is informative (a model that ignores the picture is right only by
chance; `baseline_accuracy` computes how often always answering the training set's mean box is right).
`positions` > 0 puts shapes on a `positions x positions` grid of cells instead, an easier task.

Records carry the box as numbers, not text: `"box": [x1, y1, x2, y2]` in the image's pixels, the answer
`{box}`. Training writes `{box}` in the format the model's spec declares (`boxes = ...`, see
vlmspec.runtime.grounding.box_turns), so one data set trains MiniGPT-v2, KOSMOS-2 or Qwen2.5-VL alike.
Files: images/grounding_NNNNNN.png, train_grounding.json (LLaVA conversations), test_grounding.jsonl
(`vlm eval --task grounding` records).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmspec.fsutil import atomic_write_text
from vlmspec.runtime.grounding import iou
from vlmspec.runtime.inputs.synth import BACKGROUNDS, COLORS, SHAPES, _draw_shape

Box4 = tuple[float, float, float, float]


def referring_expression(color: str, shape: str, task_token: str) -> str:
    """MiniGPT-v2 asks `[refer] the red circle`; without a task token, a plain question."""
    return f"{task_token} the {color} {shape}" if task_token else f"Where is the {color} {shape}?"


def _place(rng: random.Random, size: int, positions: int, taken: Box4 | None) -> tuple[float, float, float]:
    """A shape's centre and radius, not overlapping `taken` much."""
    for _ in range(50):
        if positions:
            cell = size / positions
            r = cell * 0.4
            cx = (rng.randrange(positions) + 0.5) * cell
            cy = (rng.randrange(positions) + 0.5) * cell
        else:
            r = rng.uniform(0.12, 0.3) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if taken is None or iou((cx - r, cy - r, cx + r, cy + r), taken) == 0.0:
            return cx, cy, r
    return cx, cy, r


def draw_scene(rng: random.Random, size: int, positions: int, distractor: bool
               ) -> tuple[Image.Image, str, str, Box4]:
    """An image, the target's colour and shape, and its box (pixels, the shape's extent)."""
    background = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    cx, cy, r = _place(rng, size, positions, None)
    box = (max(0.0, cx - r), max(0.0, cy - r), min(float(size), cx + r), min(float(size), cy + r))
    _draw_shape(d, shape, cx, cy, r, COLORS[color])
    if distractor:
        other = rng.choice([c for c in COLORS if c != color])
        ox, oy, orad = _place(rng, size, positions, box)
        _draw_shape(d, rng.choice(SHAPES), ox, oy, orad, COLORS[other])
    return img, color, shape, box


def baseline_accuracy(train_boxes: list[Box4], test_boxes: list[Box4], threshold: float = 0.5) -> tuple[float, float]:
    """(accuracy at IoU >= threshold in percent, mean IoU) of always answering the training set's mean box."""
    n = len(train_boxes)
    mean = tuple(sum(b[i] for b in train_boxes) / n for i in range(4))
    ious = [iou(mean, b) for b in test_boxes]
    return 100.0 * sum(v >= threshold for v in ious) / len(ious), sum(ious) / len(ious)


def synthesize_grounding(out: str | Path, n_train: int = 2000, n_test: int = 200, size: int = 64, seed: int = 0,
                         task_token: str = "[refer]", positions: int = 0, distractors: bool = True) -> dict:
    """Write the grounding split to `out` (deterministic for a seed); returns counts and the mean-box baseline."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train: list[dict] = []
    test: list[dict] = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            img, color, shape, box = draw_scene(rng, size, positions, distractors and rng.random() < 0.75)
            name = f"images/grounding_{split}_{i:06d}.png"
            img.save(root / name)
            q = referring_expression(color, shape, task_token)
            if split == "train":
                train.append({"id": f"g-{i}", "image": name, "box": [round(v, 2) for v in box], "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "{box}"}]})
            else:
                test.append({"id": f"g-{i}", "image": name, "question": q, "box": [round(v, 2) for v in box]})
    atomic_write_text(root / "train_grounding.json", json.dumps(train, indent=1))
    atomic_write_text(root / "test_grounding.jsonl", "".join(json.dumps(r) + "\n" for r in test))
    acc, miou = baseline_accuracy([tuple(r["box"]) for r in train], [tuple(r["box"]) for r in test]) \
        if train and test else (0.0, 0.0)
    return {"grounding_train": n_train, "grounding_test": n_test, "mean_box_accuracy": acc, "mean_box_iou": miou}


def grounding_corpus(task_token: str = "[refer]") -> list[str]:
    """Referring expressions and box-shaped text, for training a tokenizer that can write them."""
    texts = [referring_expression(c, s, task_token) for c in COLORS for s in SHAPES]
    texts += ["{<" + "><".join(str(v) for v in (a, b, c, d)) + ">}"
              for a, b, c, d in zip(range(0, 101), range(3, 101), range(7, 101), range(11, 101), strict=False)]
    return texts * 10

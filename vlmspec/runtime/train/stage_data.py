"""A stage's data: where it is, read, checked and encoded, before any stage trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.data import Dataset
from vlmspec.runtime.inputs.processor import Encoded, Processor


@dataclass(slots=True)
class Encodings:
    examples: list[Encoded]
    pixels: list[torch.Tensor | None]


@dataclass(slots=True)
class Prepared:
    """A stage's data, ready before any stage trains: first-stage objective weights, encoded samples,
    and (first stage) the caption token ids."""

    first: dict[str, float]
    enc: Encodings
    texts: list[list[int]]


def stage_data(stage: Stage, data: str | None, images: str | None) -> tuple[str, str, str | None]:
    """(data file, format, image folder) of a stage: its own `data`, relative to --data when that is a folder."""
    fmt = "auto"
    if stage.data is not None:
        path = stage.data.path
        fmt = stage.data.format
        images = stage.data.images or images
        if data and Path(data).is_dir() and not Path(path).is_absolute():
            path = str(Path(data) / path)
            if images and not Path(images).is_absolute():
                images = str(Path(data) / images)
    elif data:
        path = data
        if Path(path).is_dir():
            raise user_error("E0522", f"stage `{stage.name}` names no data file and --data is a folder",
                             help=f'add `data "FILE"` to stage `{stage.name}` or pass --data FILE')
    else:
        raise user_error("E0522", f"stage `{stage.name}` has no data", help="pass --data FILE or add `data \"FILE\"`")
    return path, fmt, images


def encode_dataset(ds: Dataset, processor: Processor) -> Encodings:
    needs_image = processor.transform is not None
    examples, pixels = [], []
    for s in ds.samples:
        n_images = 1 if (s.image is not None and needs_image) else 0
        # what generation reads: a native-size image at its processor's size, a laid-out one as tiles
        item = processor.image_transform(s.image) if n_images else None
        # a laid-out image is written as its size makes it (a fixed-size one as the fusion's count)
        examples.append(processor.encode_turns(s.turns, n_images, processor.image_slot(item) if n_images else None))
        pixels.append(item)
    return Encodings(examples, pixels)

"""What a stage's data costs in image tokens, read from the images' headers: the per-sample counts a plan
(`vlm train --dry-run`) prints beside the memory estimate, since an any-resolution model's sequence length
follows its images' sizes (LLaVA-NeXT: 1,176 to 2,928 tokens per image), not one number of the spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.ir import Stage
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.inputs.data import read_dataset
from vlmspec.runtime.inputs.token_count import ImageTokens
from vlmspec.runtime.train.stage_data import stage_data

#: samples read per stage: enough for the range and the mean, bounded for very large sets
MAX_SAMPLES = 20000


@dataclass(frozen=True, slots=True)
class DataPlan:
    """A stage's data: how many samples, how many were read, and their image tokens per sample."""

    path: str
    samples: int
    read: int
    fewest: int
    most: int
    mean: float
    over_context: int  # samples whose image tokens alone exceed the language model's context


def data_plan(analysis: Analysis, stage: Stage, data: str | None, images: str | None) -> DataPlan | str:
    """The stage's data plan, or why there is none (a plan without data is still a plan: it says so)."""
    if data is None and stage.data is None:
        return "none given (pass --data to count each sample's image tokens)"
    try:
        path, fmt, image_dir = stage_data(stage, data, images)
    except UserInputError as e:
        return e.diagnostics[0].message
    if not Path(path).is_file():
        return f"{path} not found"
    counter = ImageTokens(analysis)
    needs_image = counter.cfg is not None
    ds = read_dataset(path, fmt, image_dir, needs_image=needs_image)
    counts = []
    for s in ds.samples[:MAX_SAMPLES]:
        if s.image is None or not needs_image:
            counts.append(0)
            continue
        with Image.open(s.image) as im:  # the header only: no pixel is decoded
            width, height = im.size
        counts.append(counter(height, width))
    if not counts:
        return f"{path} holds no samples"
    lm = analysis.ir.language.config if analysis.ir.language else None
    context = analysis.ir.settings.max_length or (lm.max_positions if lm else 0)
    return DataPlan(path, len(ds.samples), len(counts), min(counts), max(counts), sum(counts) / len(counts),
                    sum(1 for c in counts if context and c >= context))

"""A stage with `objective contrastive` (CLIP / SigLIP pre-training), on the first-stage path of the loop.

The loop treats it as it treats BLIP-2's first stage: each sample is an image and a caption, each
micro-batch one forward of a loss module (so DDP all-reduces exactly this loss's gradients), and the
loss kind comes from the model's contrastive fusion (`softmax` or `sigmoid`). The other pairs of a
micro-batch are each pair's negatives, so a micro-batch of one is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.data import Dataset
from vlmspec.runtime.inputs.processor import Encoded
from vlmspec.runtime.train.loader import StageImages
from vlmspec.runtime.train.stage_data import Encodings, Prepared

CONTRASTIVE = "contrastive"


class ContrastiveLoss(torch.nn.Module):
    """The contrastive model seen through its loss: forward(pixels, ids, mask) -> {"contrastive": loss}."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        self.model.contrastive.clamp_scale()  # CLIP's rule, applied to the previous step's update
        return {CONTRASTIVE: self.model.loss(pixel_values, ids, mask)}


def prepare(ds: Dataset, processor: Any) -> Prepared:
    """Each sample's caption ids (from its answer text: a captions record's caption) and its image path."""
    texts = [processor.caption_ids(" ".join(a for _, a in s.turns).strip()) for s in ds.samples]
    images = StageImages([s.image for s in ds.samples], processor.image_transform)
    examples = [Encoded(input_ids=t, labels=[]) for t in texts]  # no language-model targets
    return Prepared({CONTRASTIVE: 1.0}, Encodings(examples, images), texts)


def check_micro_batch(stage: Stage, micro: int, accum: int, world: int) -> None:
    if micro < 2:
        raise user_error("E0618", f"stage `{stage.name}`: the contrastive loss contrasts the pairs of a micro-batch, "
                         f"and batch {stage.batch} leaves {micro} per micro-batch",
                         help=f"raise `batch` to at least {2 * accum * world} (or accumulate less)")


def step_inputs(processor: Any, pix: list, texts: list[list[int]], stage: Stage) -> tuple[Tensor, Tensor, Tensor]:
    """One micro-batch's (pixel_values, input_ids, attention_mask)."""
    if not pix or any(p is None for p in pix):
        raise user_error("E0618", f"stage `{stage.name}`: the contrastive loss needs an image with every caption")
    ids, mask = processor.captions(texts)
    return processor.stack(pix)[0], ids, mask

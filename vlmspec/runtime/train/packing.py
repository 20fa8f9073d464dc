"""Sequence packing (`packing` in a stage): several samples per row of a micro-batch, each computed as if alone.

A micro-batch's samples are packed into rows (first-fit decreasing), never across micro-batches: the
samples of every optimizer step, the data order and the resume position stay exactly those of the
unpacked run, and the loss (summed over the same targets, divided by the same token count) equals its
loss; only the padding goes. Inside a row the model keeps each sample apart (`segment_ids`: a
block-diagonal attention mask, positions restarted per sample, each sample's own bidirectional prefix
and M-RoPE grid, its image's features at its image tokens).

Rows are as long as the micro-batch's longest sample (`packing = true`) or a given length
(`packing = 4096`; a longer sample gets a row of its own). Attention still costs each row's length
squared, so the gain is the padded tokens every other layer no longer computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmspec.runtime.inputs.processor import IGNORE, Encoded, Processor


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` grouped into rows of at most `capacity` tokens (a
    longer sample gets its own row). Ties keep the given order, so the rows are a function of the input."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[k] <= free:
                rows[r].append(k)
                room[r] -= lengths[k]
                break
        else:
            rows.append([k])
            room.append(capacity - lengths[k])
    return rows


@dataclass(slots=True)
class PackStats:
    """Token slots a stage computed: real tokens, the packed rows' slots, and what unpacked rows would take."""

    real: int = 0
    packed: int = 0
    unpacked: int = 0
    samples: int = 0
    rows: int = 0

    def add(self, other: PackStats) -> None:
        self.real += other.real
        self.packed += other.packed
        self.unpacked += other.unpacked
        self.samples += other.samples
        self.rows += other.rows

    @property
    def padding(self) -> float:
        """Fraction of the packed rows' slots that are padding."""
        return 1 - self.real / self.packed if self.packed else 0.0

    @property
    def unpacked_padding(self) -> float:
        return 1 - self.real / self.unpacked if self.unpacked else 0.0

    def line(self) -> str:
        return (f"packing: {self.samples} samples in {self.rows} rows ({self.samples / max(1, self.rows):.1f} per row), "
                f"padding {100 * self.padding:.1f}% of the tokens computed (unpacked: {100 * self.unpacked_padding:.1f}%)")


def packed_layout(examples: list[Encoded], packing: bool | int,
                  limit: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(rows of micro-batch positions, reading order) for a stage's `packing`; rows never exceed `limit`
    (the language model's max_positions) unless one sample alone does."""
    lengths = [len(e.input_ids) for e in examples]
    capacity = max(lengths) if packing is True else int(packing)
    if limit is not None:
        capacity = min(capacity, limit)
    capacity = max(capacity, max(lengths))
    rows = pack_rows(lengths, capacity)
    return rows, [k for row in rows for k in row]


def packed_batch(processor: Processor, examples: list[Encoded], rows: list[list[int]],
                 pixel_values: torch.Tensor | None, facts: torch.Tensor | None) -> dict[str, Any]:
    """Right-padded rows of concatenated samples: input_ids, attention_mask, labels (-100 at each sample's
    first token, which no target precedes in its own row, and on prompts and padding) and segment_ids.
    pixel_values / facts: the samples' images stacked in reading order (row by row)."""
    width = max(sum(len(examples[k].input_ids) for k in row) for row in rows)
    input_ids = torch.full((len(rows), width), processor.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for seg, k in enumerate(row, start=1):
            e = examples[k]
            n = len(e.input_ids)
            input_ids[i, at:at + n] = torch.tensor(e.input_ids)
            labels[i, at:at + n] = torch.tensor(e.labels if e.labels is not None else e.input_ids)
            labels[i, at] = IGNORE
            mask[i, at:at + n] = 1
            segments[i, at:at + n] = seg
            at += n
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "segment_ids": segments}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    batch.update(processor.image_kwargs(facts))
    return batch


def pack_stats(examples: list[Encoded], rows: list[list[int]]) -> PackStats:
    lengths = [len(e.input_ids) for e in examples]
    width = max(sum(lengths[k] for k in row) for row in rows)
    return PackStats(real=sum(lengths), packed=len(rows) * width, unpacked=len(lengths) * max(lengths),
                     samples=len(lengths), rows=len(rows))

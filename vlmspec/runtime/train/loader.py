"""A stage's images, read in worker processes in the exact order the stage trains on them.

Three parts, each owning one fact:

- `StageImages`: sample index -> that sample's transformed image (the processor's image transform), read
  from its file when asked. It holds the paths and the transform only, so a worker process gets nothing
  it does not need (no tokenizer, no model) and the pixels of a stage are never all in memory at once.
- `DataOrder`: which samples each optimizer step of this rank trains on, as micro-batches. The order is
  a function of (seed, step) alone, never of a stateful iterator, so a run resumed at step k reads
  exactly the micro-batches an uninterrupted run reads from step k onwards.
- `StageBatches`: a `torch.utils.data.DataLoader` over both, from a given step onwards: `workers`
  processes (0: read on the training process, as before), prefetching, pinned memory only when the
  model is on CUDA. The processor's `stack` / `training_batch` stay on the training process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class StageImages(torch.utils.data.Dataset):
    """Each sample's transformed image (None for a sample without one), read when indexed."""

    def __init__(self, paths: Sequence[Path | None], transform: Any):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Any:
        path = self.paths[k]  # an IndexError past the end also ends plain iteration (`list(images)`)
        return self.transform(path) if path is not None else None


@dataclass(frozen=True, slots=True)
class DataOrder:
    """One rank's micro-batches for each optimizer step: epoch e's samples in a permutation seeded by
    (seed, e); a step takes the next `global_batch` of them (wrapping around on small data), this rank
    every `world`-th, cut into `accum` micro-batches of `micro`."""

    n: int
    global_batch: int
    steps_per_epoch: int
    seed: int
    accum: int
    micro: int
    rank: int = 0
    world: int = 1

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()
        batch_ids = order[pos * self.global_batch:(pos + 1) * self.global_batch]
        if len(batch_ids) < self.global_batch:  # small data: wrap around
            batch_ids = (batch_ids + order)[:self.global_batch]
        mine = batch_ids[self.rank::self.world]
        return [mine[j * self.micro:(j + 1) * self.micro] for j in range(self.accum)]


class FromStep(Sampler[list[int]]):
    """`DataOrder`'s micro-batches of steps `start` .. `stop - 1`, in order: the DataLoader's batch sampler."""

    def __init__(self, order: DataOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.order.micro_batches(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.order.accum


@dataclass(slots=True)
class MicroBatch:
    """Which samples a micro-batch holds and their transformed images. Same-shape tensor images travel
    from a worker as one tensor (`packed`): one shared-memory block per micro-batch, not one per image."""

    ids: list[int]
    loose: list[Any]  # one transformed image (or None) per id, when they do not pack
    packed: torch.Tensor | None = None

    @property
    def items(self) -> list[Any]:
        """One transformed image (or None) per id, as `processor.stack` takes them."""
        return list(self.packed.unbind(0)) if self.packed is not None else self.loose

    def pin_memory(self) -> MicroBatch:
        """What the DataLoader's pin-memory thread calls (CUDA only): page-locked tensors."""
        pin = [x.pin_memory() if isinstance(x, torch.Tensor) else x for x in self.loose]
        return MicroBatch(self.ids, pin, self.packed.pin_memory() if self.packed is not None else None)


class _Indexed(torch.utils.data.Dataset):
    """(index, item): each micro-batch says which samples it holds, so the loop can check the order."""

    def __init__(self, images: StageImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[int, Any]:
        return k, self.images[k]


def collate(pairs: list[tuple[int, Any]]) -> MicroBatch:
    """The items, still one per sample: stacking (and its padding of tiles) is the processor's, on the
    training process; only same-shape tensors are packed for the trip (`MicroBatch.items` unpacks them)."""
    ids, items = [k for k, _ in pairs], [x for _, x in pairs]
    if items and all(isinstance(x, torch.Tensor) and x.shape == items[0].shape and x.dtype == items[0].dtype
                     for x in items):
        return MicroBatch(ids, [], torch.stack(items))
    return MicroBatch(ids, items)


def default_workers() -> int:
    """Worker processes per training process: a quarter of its CPUs, at most 4. Training here runs on the
    CPU too, and a worker takes cores from its matmuls: on 2 CPUs one worker cost a tiny LLaVA 25% of its
    tokens/s (64 px images decode in well under a millisecond), so small machines read on the training
    process; on larger ones a few workers keep decoding off the step, more mostly cost memory. The CPUs
    are those this process may use (containers, taskset), shared among torchrun's local processes."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(4, per_process // 4)


class StageBatches:
    """The micro-batches of steps `start` .. `stop - 1`, read by a DataLoader; use as a context manager
    so its worker processes end with the stage (or with the exception that ends it)."""

    def __init__(self, images: StageImages, order: DataOrder, start: int, stop: int, workers: int,
                 pin_memory: bool = False, prefetch: int = 2):
        multi = workers > 0
        self.loader = DataLoader(
            _Indexed(images), batch_sampler=FromStep(order, start, stop), collate_fn=collate,
            num_workers=workers, pin_memory=pin_memory, prefetch_factor=prefetch if multi else None,
            # one pass per stage: nothing to keep workers alive for
            persistent_workers=False,
            # fork shares the paths and transform without pickling them and starts fast; elsewhere the
            # platform's default (the dataset pickles: paths and a transform)
            multiprocessing_context="fork" if multi and sys.platform.startswith("linux") else None,
            # the loader draws its workers' base seed from this, never from the global RNG that dropout
            # and a resumed checkpoint's RNG state share
            generator=torch.Generator().manual_seed(order.seed))
        self._it: Iterator[MicroBatch] | None = None

    def __enter__(self) -> StageBatches:
        self._it = iter(self.loader)
        return self

    def __exit__(self, *exc: object) -> None:
        self._it = None  # the iterator's last reference: its workers shut down

    def next(self, ids: list[int]) -> list[Any]:
        """The next micro-batch's items, which must be the samples `ids` (the loop's own order)."""
        if self._it is None:
            raise RuntimeError("StageBatches is read inside its `with` block")
        mb = next(self._it)
        if mb.ids != ids:
            raise RuntimeError(f"data loader out of step: expected samples {ids}, got {mb.ids}")
        return mb.items

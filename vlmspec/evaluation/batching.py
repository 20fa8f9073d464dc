"""What every evaluation loop shares: batches, images opened batch by batch, a progress bar.

Images are opened per batch because a whole COCO split does not fit in memory as pixels, and an image
that cannot be read becomes a bad record of its sample (same `max_bad` limit as malformed records)
rather than the end of a long run.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from vlmspec.diagnostics import UserInputError
from vlmspec.evaluation.formats import EvalSample
from vlmspec.runtime.inputs.data import BadRecord

T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    size = max(1, size)
    for i in range(0, len(items), size):
        yield items[i:i + size]


def open_image(path: Path) -> Any:
    """A PIL RGB image; bad files raise the runtime's one-line `UserInputError`s."""
    from vlmspec.runtime.inputs.images import open_image as _open

    return _open(path)


def png_bytes(path: Path) -> bytes:
    """The image re-encoded as PNG (a server is told `image/png`, whatever the file was)."""
    buf = io.BytesIO()
    open_image(path).save(buf, format="PNG")
    return buf.getvalue()


def open_batch(samples: Sequence[EvalSample], bad: list[BadRecord],
               opener: Callable[[Path], Any] = open_image) -> tuple[list[EvalSample], list[Any]]:
    """Open each sample's image; an unreadable one becomes a bad record and its sample is skipped."""
    kept, images = [], []
    for s in samples:
        try:
            images.append(opener(s.image))
        except UserInputError as e:
            bad.append(BadRecord(s.where, e.diagnostics[0].message))
            continue
        kept.append(s)
    return kept, images


@contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (nothing when disabled); yields `advance(n)`."""
    if not enabled or total == 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(file=sys.stderr), transient=False)
    task = prog.add_task(label, total=total)
    with prog:
        yield lambda n: prog.update(task, advance=n)

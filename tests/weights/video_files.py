"""Videos the parity tests make: a folder of PNG frames, or an MPEG-4 file written with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_folder(path: Path, frames: list[np.ndarray]) -> Path:
    """`frame_000.png`, `frame_001.png`, ... in a new folder `path`."""
    from PIL import Image

    path.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(path / f"frame_{i:03d}.png")
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: int = 5) -> Path:
    """An MPEG-4 file of these frames at `fps` (PyAV; the test is skipped without it)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path

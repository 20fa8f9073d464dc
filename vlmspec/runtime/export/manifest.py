"""`manifest.json`: what an export folder holds and how to call it, readable without vlmspec.

    {"format": "vlmspec-export", "format_version": 1, "model": ..., "spec": "spec.vlm", "spec_hash": ...,
     "image_token_id": ..., "ban_image_token": ..., "dtype": ..., "max_len": ..., "max_batch": ...,
     "dims": {"batch": {"min", "max"}, "seq": {...}}, "notes": [...], "versions": {...},
     "interface": {"fusions", "in_sequence", "cross_attention", "tiled", "programs": {...}},
     "artefacts": {FORMAT: {PROGRAM: {"half", "file", "bytes", "inputs", "outputs"}}}}

Shapes list ints and the names of symbolic dims (`"batch"`, `"seq"`), whose ranges are in `dims`.
The spec hash ties the artefacts to the architecture they were traced from: the runner refuses a
folder whose spec.vlm no longer hashes to it.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from vlmspec.compiler.compile import Analysis
from vlmspec.runtime.export.errors import bad_folder
from vlmspec.runtime.export.interface import STEM, Interface

FORMAT = "vlmspec-export"
FORMAT_VERSION = 1
NAME = "manifest.json"
#: format -> artefact suffix
SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "tensorrt": ".trt.ep"}


def spec_hash(analysis: Analysis) -> str:
    """The resolved architecture's fingerprint (the same IR gives the same hash, whatever the formatting)."""
    return hashlib.sha256(analysis.ir.model_dump_json().encode()).hexdigest()[:16]


def versions() -> dict[str, str | None]:
    """Versions of the libraries that wrote (and must read) the artefacts; None = not installed."""
    import vlmspec

    out: dict[str, str | None] = {"vlmspec": vlmspec.__version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "torch_tensorrt"):
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def artefact_file(fmt: str, program: str) -> str:
    return STEM[program] + SUFFIXES[fmt]


def build(analysis: Analysis, iface: Interface, image_token_id: int, artefacts: dict[str, dict[str, Path]],
          notes: list[str], max_batch: int) -> dict[str, Any]:
    described = iface.to_json()
    programs = described.pop("programs")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": analysis.ir.name, "spec": "spec.vlm", "spec_hash": spec_hash(analysis),
        "image_token_id": image_token_id, "ban_image_token": bool(iface.in_sequence),
        "dtype": described.pop("dtype"), "max_len": described.pop("max_len"), "max_batch": max_batch,
        "dims": described.pop("dims"), "notes": notes, "versions": versions(),
        "interface": {**described, "programs": programs},
        "artefacts": {
            fmt: {prog: {"half": programs[prog]["half"], "file": path.name, "bytes": path.stat().st_size,
                         "inputs": programs[prog]["inputs"], "outputs": programs[prog]["outputs"]}
                  for prog, path in files.items()}
            for fmt, files in artefacts.items()},
    }


def write(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read(folder: Path) -> dict[str, Any]:
    path = folder / NAME
    if not path.is_file():
        raise bad_folder(f"{folder} is not an export folder (no {NAME})",
                         help="write one with vlmspec.runtime.export.export_model (`vlm export DIR -o OUT`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise bad_folder(f"{path} is not valid JSON: {e.msg}") from None
    if manifest.get("format") != FORMAT:
        raise bad_folder(f"{path} was not written by vlmspec's exporter")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise bad_folder(f"{path} has format version {manifest['format_version']}, newer than this vlmspec reads "
                         f"({FORMAT_VERSION})", help="upgrade vlmspec")
    return manifest

"""Tracing the halves with `torch.export` and saving them as `.pt2` files.

Non-strict tracing (the Python runs as is, under fake tensors): the model code is plain PyTorch,
and ENV-NOTES found strict and non-strict equally exact; non-strict gives clearer errors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram

from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.export.errors import exporter_failed
from vlmspec.runtime.export.interface import Interface
from vlmspec.runtime.export.patches import exportable
from vlmspec.runtime.model import VisionLanguageModel


def trace(wrapper: nn.Module, iface: Interface, program: str, model: VisionLanguageModel,
          device: torch.device | str = "cpu") -> ExportedProgram:
    """One program as an `ExportedProgram` with the interface's dynamic dims."""
    args = tuple(a.to(device) for a in iface.example_inputs(program, model))
    try:
        with exportable(wrapper), torch.no_grad():
            return torch.export.export(wrapper, args, dynamic_shapes=iface.dynamic_shapes(program), strict=False)
    except VlmSpecError:
        raise
    except Exception as e:  # torch.export raises many error types; the user gets one line
        raise exporter_failed(program, "torch.export", e) from e


def save_pt2(ep: ExportedProgram, path: Path) -> None:
    torch.export.save(ep, str(path))

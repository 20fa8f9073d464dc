"""Where a run's tensors live and how it computes: one answer for every command.

`vlm build / generate / serve / eval / train --device auto` means the GPU when torch sees one and the CPU
otherwise; under torchrun each process takes the GPU of its local rank. Everything a command feeds the
model goes through `move`, so no path builds its inputs on one device and its model on another. A stage's
`precision` is autocast on that device (bf16 or fp16; fp16 with loss scaling, since its gradients
underflow without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch

from vlmspec.diagnostics import user_error

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the local rank's GPU when CUDA is available, else the CPU; `cuda` without one is an error."""
    if name not in (*DEVICE_CHOICES, "meta") and not name.startswith("cuda:"):
        raise user_error("E0556", f"unknown device `{name}`", help="use auto, cpu or cuda (or cuda:N)")
    if name in ("cpu", "meta"):
        return torch.device(name)
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise user_error("E0556", f"--device {name}: torch sees no CUDA device here",
                         help="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any, or a stand-in that is no module)."""
    for p in getattr(model, "parameters", tuple)():
        return p.device
    return torch.device("cpu")


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside it (dicts, lists, tuples, dataclasses) on `device`; the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(move(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The stage's `precision` as autocast on `device` (a no-op for fp32)."""
    if precision not in _AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (disabled otherwise: then `scale` and `step` pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")

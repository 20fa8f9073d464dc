"""Weight-only quantization declared per component (`quantize = int8` on the LLM, none on the encoder).

Implemented with torchao (`quantize_` with `Int8WeightOnlyConfig` / `Int4WeightOnlyConfig`), the
kept PyTorch library for it, applied to the linear layers of the components that ask for it. On GPU,
TensorRT's own int8/fp8 is used by the TensorRT export instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import user_error


def quiet_torchao() -> None:
    """Keep torchao's import quiet: on a CPU machine it logs the failed load of its CUDA-only kernels, and
    torch's pytree warns about its enums. Called before anything that imports torchao (it, and peft, which
    imports it when it is installed)."""
    for name in ("torchao", "torchao.kernel", "torchao.prototype", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _torchao():
    quiet_torchao()
    try:
        import torchao.quantization as q
    except ImportError:
        raise user_error("E0560", "quantization needs torchao", help="pip install 'torchao>=0.18,<0.19'") from None
    return q


def quantize_component(module: nn.Module, mode: str) -> int:
    """Quantize every linear layer of `module` in place; returns how many were converted."""
    if mode == "none":
        return 0
    q = _torchao()
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return 0
    if mode == "int8":
        config: Any = q.Int8WeightOnlyConfig()
    elif mode == "int4":
        if not torch.cuda.is_available():
            raise user_error("E0561", "int4 weight-only quantization needs a CUDA device here",
                             help="use `quantize = int8` on CPU")
        config = q.Int4WeightOnlyConfig()
    else:
        raise user_error("E0561", f"unknown quantization `{mode}`")
    q.quantize_(module, config, filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))
    return len(linears)


def apply_quantization(model: nn.Module, analysis: Analysis) -> dict[str, int]:
    """Quantize the components whose spec says `quantize = int8 | int4`."""
    done = {}
    for name, comp in analysis.ir.components.items():
        mode = getattr(comp.config, "quantize", "none")
        if mode != "none" and name in model.components:
            done[name] = quantize_component(model.components[name], mode)
    return done


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly torchao-wrapped) tensor really holds."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p.data if isinstance(p, nn.Parameter) else p)
    return total

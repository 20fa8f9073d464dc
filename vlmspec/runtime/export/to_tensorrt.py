"""TensorRT engines from the exported programs (`torch_tensorrt.dynamo.compile`), when the machine can.

An optional backend: torch-tensorrt needs CUDA and NVIDIA's TensorRT libraries (`pip install
'vlmspec[tensorrt]'` on a GPU machine). Without them `tensorrt_unavailable` says so in one line and
points at the ONNX artefacts, from which `trtexec` builds the same engines.

Each program is traced on the GPU (the cache is slice/mask-written, never `index_copy_`, so every op
converts), then compiled with one optimisation profile per dynamic dim (`batch`: 1 .. max_batch,
`seq`: 1 .. max_len) and saved as an ExportedProgram holding the engine (`*.trt.ep`; engines built by
`torch.compile(backend="torch_tensorrt")` could not be saved). int8 / fp8 use NVIDIA ModelOpt's
post-training quantization (calibrated on the batches given) before the trace, which is how
Torch-TensorRT takes quantized models.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from vlmspec.diagnostics import UserInputError, VlmSpecError, user_error
from vlmspec.runtime.export.errors import TENSORRT_UNAVAILABLE, bad_option, exporter_failed, missing
from vlmspec.runtime.export.interface import DTYPES, STEM, Interface, ProgramSpec

QUANTIZATIONS = ("int8", "fp8")
SUFFIX = ".trt.ep"


def tensorrt_missing() -> list[str]:
    """What this machine lacks for TensorRT (empty when it has everything); imports nothing heavy."""
    lacks = []
    if not torch.cuda.is_available():
        lacks.append("no CUDA device")
    if importlib.util.find_spec("torch_tensorrt") is None:
        lacks.append("torch_tensorrt is not installed")
    return lacks


def tensorrt_unavailable(out_dir: Path, lacks: list[str], onnx_written: bool) -> UserInputError:
    """The one-line refusal, naming the ONNX decoder file trtexec can build an engine from."""
    prefill = out_dir / f"{STEM['prefill']}.onnx"
    where = "written to" if onnx_written else "that `--format onnx` writes to"
    return user_error(
        TENSORRT_UNAVAILABLE,
        f"TensorRT export needs CUDA and torch_tensorrt, but here: {'; '.join(lacks)}",
        help=f"build engines from the ONNX artefacts {where} {out_dir} with trtexec on a GPU machine, e.g. "
             f"`trtexec --onnx={prefill} --saveEngine=decoder_prefill.plan` (likewise encoder.onnx, "
             f"decoder_step.onnx), or pip install 'vlmspec[tensorrt]' there")


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise bad_option(f"unknown TensorRT quantization `{quantize}`", help="one of: " + ", ".join(QUANTIZATIONS))


def quantize_for_tensorrt(model: torch.nn.Module, mode: str,
                          calibrate: Callable[[torch.nn.Module], Any]) -> Callable[[], Any]:
    """ModelOpt post-training quantization in place; returns the context factory to trace the result in."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode
    except ImportError:
        raise missing("nvidia-modelopt", f"TensorRT {mode} quantization", extra="tensorrt") from None
    cfg = {"int8": mtq.INT8_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[mode]
    mtq.quantize(model, cfg, forward_loop=calibrate)
    return export_torch_mode


def _input(t: Any, spec_dims: dict[str, dict[str, int]], example: torch.Tensor) -> Any:
    import torch_tensorrt

    lo, opt, hi = [], [], []
    for i, d in enumerate(t.shape):
        if isinstance(d, str):
            lo.append(spec_dims[d]["min"])
            opt.append(int(example.shape[i]))
            hi.append(spec_dims[d]["max"])
        else:
            lo.append(d)
            opt.append(d)
            hi.append(d)
    return torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=DTYPES[t.dtype])


def build_engine(ep: Any, spec: ProgramSpec, iface: Interface, example: tuple[torch.Tensor, ...], path: Path,
                 dtype: torch.dtype, quantize: str | None) -> None:
    """Compile one traced program (already on CUDA) and save it with its engine inside."""
    import torch_tensorrt

    inputs = [_input(t, iface.dims, x) for t, x in zip(spec.inputs, example, strict=True)]
    kwargs: dict[str, Any] = {"arg_inputs": inputs, "min_block_size": 1}
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    if "use_explicit_typing" in params:
        kwargs["use_explicit_typing"] = quantize is None  # weights and inputs carry the dtype already
    if "use_explicit_typing" not in params or quantize is not None:
        precisions = {dtype}
        if quantize is not None:
            precisions.add(torch.int8 if quantize == "int8" else torch.float8_e4m3fn)
        kwargs["enabled_precisions"] = precisions
    try:
        trt = torch_tensorrt.dynamo.compile(ep, **kwargs)
        torch_tensorrt.save(trt, str(path), output_format="exported_program", arg_inputs=list(example))
    except VlmSpecError:
        raise
    except Exception as e:  # TensorRT's converters raise many error types; the user gets one line
        raise exporter_failed(spec.name, "TensorRT", e) from e


def calibration_loop(batches: Iterable[dict[str, torch.Tensor]] | None) -> Callable[[torch.nn.Module], None]:
    """ModelOpt's `forward_loop`: the eager model over the given batches (input_ids, attention_mask,
    pixel_values), so the quantizers see real activations."""
    if batches is None:
        raise bad_option("TensorRT int8 / fp8 quantization needs calibration batches",
                         help="pass calibration=[{'input_ids': ..., 'attention_mask': ..., 'pixel_values': ...}]")
    data = list(batches)

    def loop(model: torch.nn.Module) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in data:
                model(**{k: v.to(device) for k, v in batch.items()})

    return loop

"""`ExportedProgram` -> ONNX with the dynamo exporter (opset 20, one file, dims named as declared).

Converting the already traced program (not the module) avoids a second trace. The exporter names
dynamic dims after its own symbols (`s27`); they are renamed to the interface's names (`batch`,
`seq`) so the ONNX graph documents itself and `trtexec --minShapes=input_ids:1x8` reads naturally.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from torch.export import ExportedProgram

from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.export.errors import exporter_failed, missing
from vlmspec.runtime.export.interface import ProgramSpec

OPSET = 20


def check_onnx_deps() -> None:
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise missing(package, "ONNX export") from None


def save_onnx(ep: ExportedProgram, spec: ProgramSpec, path: Path, opset: int = OPSET) -> None:
    import onnx
    import torch

    check_onnx_deps()
    try:
        with _quiet():
            prog = torch.onnx.export(ep, (), None, input_names=[t.name for t in spec.inputs],
                                     output_names=[t.name for t in spec.outputs], opset_version=opset,
                                     dynamo=True, external_data=False, optimize=True)
    except VlmSpecError:
        raise
    except Exception as e:  # the exporter raises its own error types; the user gets one line
        raise exporter_failed(spec.name, "ONNX", e) from e
    proto = prog.model_proto
    _rename_dims(proto, _symbol_names(ep, spec))
    onnx.save(proto, str(path))


def _symbol_names(ep: ExportedProgram, spec: ProgramSpec) -> dict[str, str]:
    """Exporter symbol (`s27`) -> declared name (`batch`), read off the traced inputs' shapes."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    names: dict[str, str] = {}
    for user_input, t in zip(ep.graph_signature.user_inputs, spec.inputs, strict=True):
        val = placeholders[user_input].meta.get("val")
        if val is None:
            continue
        for size, declared in zip(val.shape, t.shape, strict=True):
            if isinstance(declared, str) and not isinstance(size, int):
                names[str(size)] = declared
    return names


def _rename_dims(proto, names: dict[str, str]) -> None:
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")
    graph = proto.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress to stdout and logs a warning per missing torchvision op."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)

"""`export_model`: a model folder (or a live model) -> a self-contained export folder.

    OUT/manifest.json          the declared interface, artefact files, spec hash, versions
    OUT/encoder.{pt2,onnx}     pixels -> visual tokens per fusion
    OUT/decoder_prefill.*      prompt + visual tokens -> last logits + static KV cache
    OUT/decoder_step.*         one token + cache + write index -> logits + cache
    OUT/*.trt.ep               the same three as TensorRT engines (CUDA machines with torch_tensorrt)
    OUT/spec.vlm, tokenizer*   so `ExportedModel(OUT).processor` works without the model folder

The folder is assembled in a temporary sibling and renamed into place: a failed export never leaves
a half-written folder, and an existing export folder is replaced only when the new one is complete.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.fsutil import replace_dir
from vlmspec.runtime.blocks import DTYPES as SPEC_DTYPES
from vlmspec.runtime.export import manifest as mf
from vlmspec.runtime.export.errors import bad_option
from vlmspec.runtime.export.halves import DecodeHalf, EncoderHalf, PrefillHalf
from vlmspec.runtime.export.interface import DECODE, ENCODER, PREFILL, Interface
from vlmspec.runtime.export.support import check_exportable
from vlmspec.runtime.export.to_onnx import check_onnx_deps, save_onnx
from vlmspec.runtime.export.to_pt2 import save_pt2, trace
from vlmspec.runtime.export.to_tensorrt import (
    build_engine,
    calibration_loop,
    check_quantize,
    quantize_for_tensorrt,
    tensorrt_missing,
    tensorrt_unavailable,
)
from vlmspec.runtime.model import VisionLanguageModel
from vlmspec.runtime.session import Session, load_session

FORMATS = ("pt2", "onnx", "tensorrt")
PROGRAMS = (ENCODER, PREFILL, DECODE)


def export_model(model_dir_or_model: str | Path | VisionLanguageModel | Session, out_dir: str | Path,
                 formats: Sequence[str] | str = ("pt2",), max_len: int | None = None,
                 dtype: str | torch.dtype | None = None, *, max_batch: int = 64, analysis: Analysis | None = None,
                 tokenizer: Any = None, quantize: str | None = None,
                 calibration: Iterable[dict[str, torch.Tensor]] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export a model as an encoder half and a decoder half (prefill + decode step) with a static KV
    cache, in each of `formats` ("pt2", "onnx", "tensorrt"), into `out_dir`; returns the manifest.

    max_len: cache length (default: the language model's max_positions; at most that). dtype: "fp32",
    "bf16", "fp16" or a torch dtype (default: the model's own). max_batch: the largest batch the
    artefacts accept. A session (`vlmspec.load`) or a model folder brings its analysis and tokenizer; a
    live model needs `analysis=` and, for a self-contained folder, `tokenizer=`.
    quantize / calibration: TensorRT-only int8 / fp8 post-training quantization and its batches.
    """
    say = progress or (lambda _msg: None)
    fmts = _formats(formats)
    check_quantize(quantize)
    if quantize is not None and "tensorrt" not in fmts:
        raise bad_option("quantize applies to the tensorrt format only", help="add tensorrt to the formats")
    if max_batch < 1:
        raise bad_option(f"max_batch must be >= 1, got {max_batch}")
    out = Path(out_dir)
    _check_target(out)
    if "tensorrt" in fmts and (lacks := tensorrt_missing()):
        raise tensorrt_unavailable(out, lacks, onnx_written=(out / "decoder_prefill.onnx").is_file())
    if "onnx" in fmts:
        check_onnx_deps()
    model, analysis, tokenizer, spec_text = _resolve(model_dir_or_model, analysis, tokenizer)
    notes = check_exportable(model)
    model = _cast(model, dtype)
    length = _max_len(model, max_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep a serving user out of the final folder
    try:
        with _eval(model), warnings.catch_warnings():
            # torch's own exporter deep-copies pytree specs through a deprecated isinstance check
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            iface = Interface.of(model, length, max_batch)
            _check_room(iface)
            artefacts: dict[str, dict[str, Path]] = {}
            if "pt2" in fmts or "onnx" in fmts:
                wrappers = _wrappers(model, iface)
                for prog in PROGRAMS:
                    say(f"tracing the {prog} program")
                    ep = trace(wrappers[prog], iface, prog, model)
                    for fmt in ("pt2", "onnx"):
                        if fmt not in fmts:
                            continue
                        path = tmp / mf.artefact_file(fmt, prog)
                        say(f"writing {path.name}")
                        if fmt == "pt2":
                            save_pt2(ep, path)
                        else:
                            save_onnx(ep, iface.programs[prog], path)
                        artefacts.setdefault(fmt, {})[prog] = path
            if "tensorrt" in fmts:
                artefacts["tensorrt"] = _tensorrt(model, iface, tmp, quantize, calibration, say)
        (tmp / "spec.vlm").write_text(spec_text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest = mf.build(analysis, iface, model.image_token_id, _ordered(artefacts, fmts), notes, max_batch)
        manifest["eos_token_id"] = getattr(tokenizer, "eos_token_id", None)
        manifest["pad_token_id"] = getattr(tokenizer, "pad_token_id", None)
        mf.write(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------- options


def _formats(formats: Sequence[str] | str) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for f in (x.strip().lower() for x in items):
        if f not in FORMATS:
            raise bad_option(f"unknown export format `{f}`", help="one of: " + ", ".join(FORMATS))
        if f not in out:
            out.append(f)
    if not out:
        raise bad_option("no export format given", help="one or more of: " + ", ".join(FORMATS))
    return out


def _ordered(artefacts: dict[str, dict[str, Path]], fmts: list[str]) -> dict[str, dict[str, Path]]:
    return {f: artefacts[f] for f in fmts if f in artefacts}


def _check_target(out: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / mf.NAME).is_file())):
        raise bad_option(f"{out} exists and is not an export folder", help="choose a new or empty output folder")


def _resolve(src: str | Path | VisionLanguageModel | Session, analysis: Analysis | None,
             tokenizer: Any) -> tuple[VisionLanguageModel, Analysis, Any, str]:
    """(model, analysis, tokenizer, spec text) from a model folder, a session or a live model."""
    if isinstance(src, str | Path):
        path = Path(src)
        if not path.is_dir():
            raise bad_option(f"{path} is not a model folder", help="export a folder written by `vlm build` or "
                             "`vlm train`")
        src = load_session(path)
    if isinstance(src, Session):
        tokenizer = tokenizer if tokenizer is not None else src.tokenizer
        model, analysis = src.model, src.analysis
    else:
        model = src
        if analysis is None:
            raise bad_option("exporting a live model needs its Analysis",
                             help="pass analysis=vlmspec.check('spec.vlm:model'), or export a model folder")
    spec_path = Path(analysis.file)
    spec_text = spec_path.read_text(encoding="utf-8") if spec_path.is_file() else ""
    return model, analysis, tokenizer, spec_text


def _cast(model: VisionLanguageModel, dtype: str | torch.dtype | None) -> VisionLanguageModel:
    """The model in `dtype`: a copy when that changes anything (the caller's model stays as it was)."""
    if dtype is None:
        return model
    target = SPEC_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if target not in SPEC_DTYPES.values():
        raise bad_option(f"unknown dtype `{dtype}`", help="one of: " + ", ".join(SPEC_DTYPES))
    if all(p.dtype == target for p in model.parameters() if p.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype=target)


def _max_len(model: VisionLanguageModel, max_len: int | None) -> int:
    limit = model.llm.c.max_positions
    if max_len is None:
        return limit
    if not 2 <= max_len <= limit:
        raise bad_option(f"max_len must be in 2..{limit} (the language model's max_positions), got {max_len}",
                         help="positions past max_positions were never trained (OPT has no table rows for them)")
    return max_len


def _check_room(iface: Interface) -> None:
    n = sum(iface.visual_spec(f).shape[1] for f in iface.in_sequence)
    if iface.max_len < n + 2:
        raise bad_option(f"max_len = {iface.max_len} leaves no room: one image alone takes {n} tokens",
                         help=f"use max_len >= {n + 2}")


@contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _wrappers(model: VisionLanguageModel, iface: Interface) -> dict[str, nn.Module]:
    return {ENCODER: EncoderHalf(model, iface.fusions, iface.tiled),
            PREFILL: PrefillHalf(model, iface.fusions, iface.cross, iface.max_len),
            DECODE: DecodeHalf(model, iface.fusions, iface.cross, iface.max_len)}


def _tensorrt(model: VisionLanguageModel, iface: Interface, tmp: Path, quantize: str | None,
              calibration: Iterable[dict[str, torch.Tensor]] | None, say: Callable[[str], None]) -> dict[str, Path]:
    """Trace on the GPU (a copy: the caller's model stays where it was) and build one engine per program."""
    gpu = copy.deepcopy(model).to("cuda")
    ctx: Callable[[], Any] | None = None
    if quantize is not None:
        say(f"calibrating {quantize} quantization")
        ctx = quantize_for_tensorrt(gpu, quantize, calibration_loop(calibration))
    wrappers = _wrappers(gpu, iface)
    files: dict[str, Path] = {}
    for prog in PROGRAMS:
        say(f"building the TensorRT engine of the {prog} program")
        if ctx is not None:
            with ctx():
                ep = trace(wrappers[prog], iface, prog, gpu, device="cuda")
        else:
            ep = trace(wrappers[prog], iface, prog, gpu, device="cuda")
        example = tuple(a.to("cuda") for a in iface.example_inputs(prog, gpu))
        path = tmp / mf.artefact_file("tensorrt", prog)
        build_engine(ep, iface.programs[prog], iface, example, path, iface.dtype, quantize)
        files[prog] = path
    return files



"""The front end in one call: text -> AST -> IR -> graph -> passes. No torch is imported here."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlmspec.compiler.audio import check_audio
from vlmspec.compiler.graph import FlowGraph
from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.compiler.passes import (
    Shapes,
    StagePlan,
    check_stages,
    check_structure,
    check_weights,
    infer_shapes,
)
from vlmspec.compiler.resolve import Workspace, load_workspace, resolve_model
from vlmspec.compiler.video import check_video
from vlmspec.diagnostics import Diagnostic, DiagnosticSink, Span, SpecValidationError, did_you_mean


@dataclass(slots=True)
class Analysis:
    """Everything the front end knows about one model: its IR, where it was written, graph, shapes, stages."""

    ir: ModelIR
    spans: SpanTable
    graph: FlowGraph
    shapes: Shapes
    plans: list[StagePlan]
    file: str

    @property
    def total_params(self) -> int:
        return self.shapes.grand_total


@dataclass(slots=True)
class CheckResult:
    analyses: list[Analysis] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def analyse(ws: Workspace, model: str, sink: DiagnosticSink) -> Analysis | None:
    """Resolve one model and run every pass; None when an earlier phase found errors."""
    resolved = resolve_model(ws, model, sink)
    if resolved.ir is None:
        return None
    ir, spans = resolved.ir, resolved.spans
    graph = check_structure(ir, spans, sink)
    if not sink.has_errors:
        check_audio(ir, spans, graph, sink)
    if sink.has_errors:
        return None
    shapes = infer_shapes(ir, spans, graph, sink)
    check_video(ir, spans, sink)
    if sink.has_errors:
        return None
    plans = check_stages(ir, spans, shapes, sink)
    if sink.has_errors:
        return None
    check_weights(ir, spans, ws.models[model][1].path, sink)
    for (a, _b), data in graph.edges.items():
        if a in shapes.out:
            data["shape"] = str(shapes.out[a])
    return Analysis(ir, spans, graph, shapes, plans, ws.models[model][1].path)


def shapes_at_image_size(analysis: Analysis) -> Shapes:
    """Token shapes when every encoder reads `image_size` images, what vlmspec's processor feeds it. A
    dynamic-resolution encoder's own shape counts its largest images (`max_pixels`), which bounds the
    sequence but is not how many image tokens a processed image needs."""
    ir = analysis.ir
    dynamic = {n: c for n, c in ir.components.items()
               if c.role == "vision" and getattr(c.config, "resolution", "fixed") != "fixed"}
    if not dynamic:
        return analysis.shapes
    fixed = {n: c.model_copy(update={"config": c.config.model_copy(update={"resolution": "fixed"})})
             for n, c in dynamic.items()}
    ir = ir.model_copy(update={"components": {**ir.components, **fixed}})
    return infer_shapes(ir, analysis.spans, analysis.graph, DiagnosticSink())


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`file.vlm`, `file.vlm:model`, `REV:path.vlm` or `REV:path.vlm:model` -> (path, model, rev)."""
    parts = ref.split(":")
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 2:
        if parts[0].endswith(".vlm") or Path(parts[0]).is_file():
            return parts[0], parts[1] or None, None
        return parts[1], None, parts[0]
    return parts[1], parts[2] or None, parts[0]


def _git_reader(rev: str) -> Callable[[str], str | None]:
    """Read files as they were at a git revision (paths relative to the current directory)."""

    def read(path: str) -> str | None:
        rel = os.path.relpath(path)
        try:
            out = subprocess.run(["git", "show", f"{rev}:./{rel}"], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return out.stdout if out.returncode == 0 else None

    return read


def check_file(path: str, model: str | None = None, text: str | None = None, rev: str | None = None) -> CheckResult:
    """Check every model defined in `path` (or just `model`), collecting all diagnostics.

    Each model is analysed with its own sink, so an error in one does not hide the others.
    """
    sink = DiagnosticSink()
    reader = _git_reader(rev) if rev is not None else None
    if rev is not None and text is None:
        text = reader(path)
        if text is None:
            sink.error("E0004", f"cannot read `{path}` at git revision `{rev}`",
                       help="paths are relative to the current directory, e.g. `HEAD~1:specs/x.vlm`")
            return CheckResult([], sink.items, {})
    ws = load_workspace(path, sink, text, reader)
    result = CheckResult(sources=ws.sources)
    if path not in ws.files or sink.has_errors:
        result.diagnostics = sink.items
        return result
    names = ws.models_in(path)
    if model is not None:
        if model not in ws.models:
            sink.error("E0110", f"no model `{model}` in `{path}`",
                       help=did_you_mean(model, ws.models) or "models: " + ", ".join(sorted(ws.models)))
            result.diagnostics = sink.items
            return result
        names = [model]
    elif not names:
        end = min(1, len(ws.files[path].source))  # the file has text (maybe none): point at its start
        sink.error("E0110", f"`{path}` defines no model", Span(path, 1, 1, 1, 2, 0, end),
                   help="add `model NAME { ... }`")
    seen: set[tuple] = set()
    for name in names:
        own = DiagnosticSink()
        analysis = analyse(ws, name, own)
        if analysis is not None:
            result.analyses.append(analysis)
        for d in own.items:  # a base model's error is reported once, not once per derived model
            key = (d.code, d.message, d.span)
            if key not in seen:
                seen.add(key)
                sink.items.append(d)
    result.diagnostics = sink.items
    return result


def load_analysis(ref: str) -> tuple[Analysis, CheckResult]:
    """One model from `file.vlm[:model]` (the file's first model by default); raises on any error."""
    path, model, rev = split_ref(ref)
    if model is None and rev is None:
        sink = DiagnosticSink()
        ws = load_workspace(path, sink)
        if not sink.has_errors and path in ws.files:
            names = ws.models_in(path)
            model = names[0] if names else None
    result = check_file(path, model, rev=rev)
    if not result.ok or not result.analyses:
        raise SpecValidationError(result.diagnostics, result.sources)
    if model is None:
        return result.analyses[0], result
    return next(a for a in result.analyses if a.ir.name == model), result

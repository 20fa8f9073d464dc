"""`vlm show --resolved`: a model flattened to plain .vlm text, every default and inherited value written out.

The output is itself a valid spec (no `extends`), and it is what `vlm diff` and git's textconv
driver compare, so its layout is stable: components in declaration order, fields in schema order.
"""

from __future__ import annotations

from pydantic import BaseModel

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.base import fmt_value
from vlmspec.compiler.schema.stage import STAGE_ATTRS, Optim, Stage
from vlmspec.compiler.summary import human


def _flow(comp) -> str:
    if not comp.sources and comp.target is None:
        return ""
    return "(" + " + ".join(comp.sources) + (f" -> {comp.target})" if comp.target else ")")


def _field_lines(values: dict, indent: str, explicit: set[str] | None, only_explicit: bool) -> list[str]:
    lines = []
    for k, v in values.items():
        if only_explicit and explicit is not None and k not in explicit:
            continue
        if v is None:
            continue
        if isinstance(v, BaseModel) and not hasattr(v, "to_vlm"):
            inner = _field_lines({f: getattr(v, f) for f in type(v).model_fields}, indent + "  ", None, False)
            lines.append(f"{indent}{k} {{")
            lines.extend(inner)
            lines.append(f"{indent}}}")
            continue
        lines.append(f"{indent}{k} = {fmt_value(v)}")
    return lines


def stage_lines(stage: Stage, indent: str) -> list[str]:
    lines = []
    if stage.train:
        lines.append(indent + "train " + ", ".join(
            t.path + (f"(lr = {fmt_value(t.lr)})" if t.lr else "") for t in stage.train))
    if stage.freeze:
        lines.append(indent + "freeze " + ", ".join(stage.freeze))
    for lo in stage.lora:
        args = [f"rank = {lo.rank}", f"alpha = {fmt_value(lo.alpha)}"]
        if lo.dropout:
            args.append(f"dropout = {fmt_value(lo.dropout)}")
        if lo.targets:
            args.append("targets = [" + ", ".join(lo.targets) + "]")
        if lo.lr:
            args.append(f"lr = {fmt_value(lo.lr)}")
        lines.append(f"{indent}lora {lo.path}({', '.join(args)})")
    lines.append(f"{indent}optim {stage.optim.to_vlm() if isinstance(stage.optim, Optim) else stage.optim}")
    if stage.data is not None:
        lines.append(f"{indent}data {stage.data.to_vlm()}")
    lines.append(f"{indent}batch {stage.batch}")
    if stage.epochs is not None:
        lines.append(f"{indent}epochs {stage.epochs}")
    if stage.steps is not None:
        lines.append(f"{indent}steps {stage.steps}")
    lines.append(f"{indent}precision {stage.precision}")
    lines.append(indent + "objective " + " + ".join(
        o.name if o.weight == 1 else f"{fmt_value(o.weight)} * {o.name}" for o in stage.objective))
    for up in stage.upcycle:
        lines.append(f"{indent}upcycle {up.source} -> {up.dest}")
    for k in STAGE_ATTRS:
        v = getattr(stage, k)
        if v is not None:
            lines.append(f"{indent}{k} = {fmt_value(v)}")
    return lines


def resolved_text(analysis: Analysis, params: bool = True) -> str:
    ir = analysis.ir
    out = [f"# {ir.name}" + (f" (extends {' <- '.join(ir.lineage[1:])})" if len(ir.lineage) > 1 else "")]
    if params:
        out.append(f"# parameters: {analysis.total_params:,} ({human(analysis.total_params)})")
    out.append(f"model {ir.name} {{")
    for comp in ir.components.values():
        header = f"  {comp.role} {comp.name} = {comp.kind}{_flow(comp)} {{"
        if params:
            shape = analysis.shapes.out.get(comp.name)
            note = f"params {analysis.shapes.total(comp.name):,}"
            if shape is not None and comp.role != "language":
                note += f", out {shape}"
            header += f"  # {note}"
        out.append(header)
        out.extend(_field_lines(comp.field_values(resolved=True), "    ", None, False))
        out.append("  }")
    settings = ir.settings
    out.extend(_field_lines({k: getattr(settings, k) for k in type(settings).model_fields}, "  ", None, False))
    for stage, plan in zip(ir.stages, analysis.plans, strict=True):
        head = f"  stage {stage.name} {{"
        if params:
            head += f"  # trainable {plan.total_trainable + plan.lora_params:,}"
        out.append(head)
        out.extend(stage_lines(stage, "    "))
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def model_source(analysis: Analysis) -> str:
    """The model's own text, canonically formatted (its `extends` chain named, not flattened)."""
    from vlmspec.compiler import ast
    from vlmspec.compiler.printer import format_file
    from vlmspec.grammar.parser import parse

    source = analysis.spans.model
    parsed = parse(_source_of(analysis), analysis.file) if source is not None else None
    if parsed is None:
        return resolved_text(analysis)
    models = [m for m in parsed.items if isinstance(m, ast.Model) and m.name == analysis.ir.name]
    sub = ast.File(parsed.path, parsed.source, models,
                   [c for c in parsed.comments if models and models[0].span.start <= c.span.start < models[0].span.end])
    return format_file(sub)


def _source_of(analysis: Analysis) -> str:
    from pathlib import Path

    return Path(analysis.file).read_text(encoding="utf-8")

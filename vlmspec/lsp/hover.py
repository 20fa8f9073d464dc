"""Hover: what the front end knows about the name under the cursor, in a few lines of markdown.

- a component: its role, kind, parameter count, output shape, and every attribute as the model resolves
  it, each marked `# default` (the schema's value) or `# inherited from BASE` (written in a base model);
- a stage: what it trains, freezes and LoRA-adapts, its trainable parameters, and its memory plan (the
  estimate `vlm summary` prints: weights + gradients + optimizer state);
- an attribute: the schema's description, type, range and default, and its value here;
- a model, a kind, an import, a stage path part (`llm.attn`).

Facts that need a clean check (counts, shapes, plans) come from the model's `Analysis`; when the model
does not check yet, hover says so and shows what is written instead.
"""

from __future__ import annotations

from lsprotocol import types

from vlmspec.compiler import ast
from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.ir import resolved_value
from vlmspec.compiler.passes import part_params, valid_paths
from vlmspec.compiler.printer import stage_item_text, value_text
from vlmspec.compiler.schema import REGISTRY, fmt_value
from vlmspec.compiler.schema.base import ComponentSchema
from vlmspec.compiler.schema.stage import STAGE_ATTRS
from vlmspec.compiler.summary import human, summarise
from vlmspec.lsp.documents import Snapshot
from vlmspec.lsp.occurrences import Occurrence, at
from vlmspec.lsp.project import import_path
from vlmspec.lsp.schema_info import field_doc, kind_summary, markdown, schema_for

NOT_CHECKED = "_the model does not check yet: values as written; counts and shapes follow a clean check_"


def _count(n: int) -> str:
    return f"{n:,} ({human(n)})"


def _code(lines: list[tuple[str, str]]) -> str:
    """`name = value  # note` lines in a vlm code block, notes aligned."""
    width = min(max((len(t) for t, n in lines if n), default=0), 40)
    body = [f"{t:<{width}}  # {n}" if n else t for t, n in lines]
    return "```vlm\n" + "\n".join(body) + "\n```"


# ---------------------------------------------------------------- components


def _attribute_lines(snap: Snapshot, model: str, name: str, analysis: Analysis | None,
                     cls: type[ComponentSchema]) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    comp = analysis.ir.components.get(name) if analysis is not None else None
    values = comp.field_values(resolved=True) if comp is not None else {}
    explicit = comp.explicit_fields() if comp is not None else set()
    for field in cls.model_fields:
        site = snap.project.attr_site(model, name, field)
        note = ""
        if site is not None and site[2] != model:
            note = f"inherited from {site[2]}"
        if comp is not None:
            value = values.get(field)
            if value is None:
                continue
            if field not in explicit:
                note = "default"
            text = fmt_value(value)
        elif site is not None:
            entry = site[0]
            text = value_text(entry.value) if isinstance(entry, ast.Attr) else "{ ... }"
        else:
            doc = field_doc(cls, field)
            if doc is None or doc.default in (None, "none"):
                continue
            text, note = doc.default, "default"
        lines.append((f"{field} = {text}", note))
    return lines


def component_markdown(snap: Snapshot, model: str, name: str) -> str | None:
    decl = snap.project.component_decl(model, name)
    if decl is None:
        return None
    node, _path, declared_in = decl
    analysis = snap.analysis(model)
    role, kind = node.role, node.kind or node.name
    cls = REGISTRY.get(role, kind)
    head = f"**{role} `{name}`** = `{kind}`"
    if cls is not None and kind_summary(cls):
        head += f": {kind_summary(cls)}"
    out = [head]
    facts = []
    if analysis is not None and name in analysis.ir.components:
        facts.append(f"parameters: {_count(analysis.shapes.total(name))}")
        shape = analysis.shapes.out.get(name)
        if shape is not None and role in ("vision", "connector"):
            facts.append(f"output: {shape} (tokens x width per image)")
        elif shape is not None and role == "fusion":
            facts.append(f"visual input: {shape}")
        elif role == "language":
            cfg = analysis.ir.components[name].config
            facts.append(f"output: {getattr(cfg, 'vocab', '?')} logits per token")
    if declared_in != model:
        facts.append(f"declared in `{declared_in}`")
    if facts:
        out.append(" · ".join(facts))
    if cls is None:
        out.append(f"unknown {role} kind `{kind}`")
        return "\n\n".join(out)
    if analysis is None:
        out.append(NOT_CHECKED)
    lines = _attribute_lines(snap, model, name, analysis, cls)
    if lines:
        out.append(_code(lines))
    return "\n\n".join(out)


# ---------------------------------------------------------------- stages


def stage_markdown(snap: Snapshot, model: str, name: str) -> str | None:
    analysis = snap.analysis(model)
    out = [f"**stage `{name}`** of `{model}`"]
    if analysis is None:
        decl = snap.project.stage_decl(model, name)
        if decl is None:
            return None
        out.append(NOT_CHECKED)
        out.append("```vlm\n" + "\n".join(stage_item_text(i) for i in decl[0].items) + "\n```")
        return "\n\n".join(out)
    stages = {s["name"]: s for s in summarise(analysis)["stages"]}
    ir_stage = next((s for s in analysis.ir.stages if s.name == name), None)
    s = stages.get(name)
    if s is None or ir_stage is None:
        return None
    by_comp = s["params"]["by_component"]
    groups: dict[str, list[str]] = {"trains": [], "partly trains": [], "LoRA-adapts": [], "freezes": []}
    for comp, status in s["status"].items():
        label = {"trained": "trains", "partial": "partly trains", "lora": "LoRA-adapts", "frozen": "freezes"}.get(status)
        if label is None:
            continue
        n = by_comp.get(comp)
        groups[label].append(f"`{comp}`" + (f" ({human(n)})" if n and label != "freezes" else ""))
    for label, items in groups.items():
        if items:
            out.append(f"{label}: " + ", ".join(items))
    for lo in ir_stage.lora:
        targets = ", ".join(lo.targets) if lo.targets else "attention q, v (default)"
        out.append(f"LoRA on `{lo.path}`: rank {lo.rank}, alpha {fmt_value(lo.alpha)}, targets {targets}")
    trainable = s["params"]["trainable"]
    lora = s["params"]["lora"]
    out.append(f"trainable parameters: {_count(trainable)}" + (f", of which LoRA adapters {_count(lora)}" if lora else ""))
    out.append(f"optim `{s['optim']}` · batch {s['batch']} · precision {s['precision']}")
    m = s["memory"]
    seq = m.get("sequence") or {}
    out.append(f"memory plan: weights {human(m['weights'], 'B')} + gradients {human(m['grads'], 'B')} + optimizer "
               f"{human(m['optimizer'], 'B')} + activations {human(m['activations'], 'B')} = "
               f"{human(m['total'], 'B')} (one process; activations of a micro-batch of {m['micro_batch']} x "
               f"{seq.get('tokens', '?'):,} tokens)")
    return "\n\n".join(out)


# ---------------------------------------------------------------- attributes


def _value_here(snap: Snapshot, occ: Occurrence, owner: tuple[str, ...]) -> str | None:
    """The attribute's value as the model resolves it (derived defaults filled in), if the model checks."""
    analysis = snap.analysis(occ.model) if occ.model else None
    if analysis is None:
        return None
    ir = analysis.ir
    obj: object | None
    if owner[0] == "settings":
        obj = ir.settings
    elif owner[0] == "stage":
        obj = next((s for s in ir.stages if s.name == owner[1]), None)
    else:
        comp = ir.components.get(owner[1])
        if comp is None:
            return None
        if len(owner) == 2:
            known = occ.name in type(comp.config).model_fields
            return fmt_value(resolved_value(comp.config, occ.name)) if known else None
        obj = comp.config
        for part in owner[2:]:
            obj = getattr(obj, part, None)
    if obj is None or occ.name not in getattr(type(obj), "model_fields", {}):
        return None
    return fmt_value(getattr(obj, occ.name))


def attribute_markdown(snap: Snapshot, occ: Occurrence) -> str | None:
    owner = occ.owner if occ.what == "attr" else ("component", *occ.owner)
    kinds = snap.kinds(occ.model)
    cls = schema_for(owner, kinds)
    if cls is None:
        return None
    doc = field_doc(cls, occ.name)
    if doc is None or (owner[0] == "stage" and occ.name not in STAGE_ATTRS):
        return None
    if owner[0] == "settings":
        where = "model setting"
    elif owner[0] == "stage":
        where = "stage attribute"
    else:
        role, kind = kinds[owner[1]]
        where = f"`{kind}` {role} attribute" + (f" in `{'.'.join(owner[2:])}`" if len(owner) > 2 else "")
    return markdown(doc, where, _value_here(snap, occ, owner))


# ---------------------------------------------------------------- the rest


def model_markdown(snap: Snapshot, name: str) -> str | None:
    lineage = snap.project.lineage(name)
    if not lineage:
        return None
    head = f"**model `{name}`**"
    if len(lineage) > 1:
        head += " extends " + " <- ".join(f"`{m.name}`" for m, _ in lineage[1:])
    out = [head]
    analysis = snap.analysis(name)
    if analysis is None:
        out.append("_does not check yet_")
        return "\n\n".join(out)
    tokens = sum(analysis.shapes.out[f.name].tokens for f in analysis.ir.by_role("fusion") if f.name in analysis.shapes.out)
    stages = ", ".join(s.name for s in analysis.ir.stages) or "none"
    out.append(f"parameters: {_count(analysis.total_params)} · visual tokens: {tokens} · stages: {stages}")
    return "\n\n".join(out)


def kind_markdown(role: str, kind: str) -> str | None:
    cls = REGISTRY.get(role, kind)
    if cls is None:
        return f"unknown {role} kind `{kind}`; known: " + ", ".join(f"`{k}`" for k in REGISTRY.kinds(role))
    doc = (cls.__doc__ or "").strip()
    return f"**{role} kind `{kind}`**: {doc}\n\nattributes: " + ", ".join(f"`{f}`" for f in cls.model_fields)


def import_markdown(snap: Snapshot, occ: Occurrence) -> str:
    target = import_path(snap.path, occ.name)
    f = snap.project.files.get(target)
    if f is None:
        return f"**import** `{target}`: not found or does not parse"
    return f"**import** `{target}`: models " + ", ".join(f"`{m.name}`" for m in f.models)


def subpath_markdown(snap: Snapshot, occ: Occurrence) -> str | None:
    analysis = snap.analysis(occ.model) if occ.model else None
    comp = occ.owner[0]
    path = f"{comp}.{occ.name}"
    if analysis is None or path not in valid_paths(analysis.ir):
        return f"**`{path}`**: part of `{comp}`" if analysis is None else f"`{path}` is not a part of `{occ.model}`"
    kind = analysis.ir.components[comp].kind
    return f"**`{path}`**: part of `{comp}` (`{kind}`), {_count(part_params(analysis.ir, analysis.shapes, path))} parameters"


def describe(snap: Snapshot, occ: Occurrence) -> str | None:
    if occ.what == "component" and occ.model:
        return component_markdown(snap, occ.model, occ.name)
    if occ.what == "stage" and occ.model:
        return stage_markdown(snap, occ.model, occ.name)
    if occ.what in ("attr", "field_ref"):
        return attribute_markdown(snap, occ)
    if occ.what == "model":
        return model_markdown(snap, occ.name)
    if occ.what == "kind" and occ.role:
        return kind_markdown(occ.role, occ.name)
    if occ.what == "import":
        return import_markdown(snap, occ)
    if occ.what == "subpath":
        return subpath_markdown(snap, occ)
    return None


def hover(snap: Snapshot, pos: types.Position) -> types.Hover | None:
    index = snap.index()
    if index is None or snap.parsed is None:
        return None
    occ = at(snap.occurrences(), index.offset(pos))
    if occ is None:
        return None
    text = describe(snap, occ)
    if not text:
        return None
    return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=text),
                       range=index.range(occ.start, occ.end))

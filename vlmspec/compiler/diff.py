"""`vlm diff`: what changed in the architecture, on resolved IR (inherited defaults included).

The diff compares meaning, not text: reformatting, reordering or moving a value into a base model
changes nothing here, while a changed default shows up even though no line of the spec moved.
"""

from __future__ import annotations

from typing import Any

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.base import fmt_value
from vlmspec.compiler.summary import summarise


def _fields(analysis: Analysis, name: str) -> dict[str, str]:
    comp = analysis.ir.components[name]
    out = {"kind": comp.kind}
    if comp.sources or comp.target:
        out["flow"] = " + ".join(comp.sources) + (f" -> {comp.target}" if comp.target else "")
    out.update({k: fmt_value(v) for k, v in comp.field_values(resolved=True).items()})
    return out


def _stage_fields(stage) -> dict[str, str]:
    out = {}
    for k in type(stage).model_fields:
        if k == "name":
            continue
        v = getattr(stage, k)
        if k == "train":
            v = [t.path + (f"(lr = {fmt_value(t.lr)})" if t.lr else "") for t in v]
        elif k == "lora":
            v = [f"{lo.path}(" + ", ".join(
                [f"rank = {lo.rank}", f"alpha = {fmt_value(lo.alpha)}"]
                + ([f"targets = [{', '.join(lo.targets)}]"] if lo.targets else [])
                + ([f"lr = {fmt_value(lo.lr)}"] if lo.lr else [])) + ")" for lo in v]
        elif k == "objective":
            v = " + ".join(o.name if o.weight == 1 else f"{fmt_value(o.weight)} * {o.name}" for o in v)
        elif k == "upcycle":
            v = [f"{u.source} -> {u.dest}" for u in v]
        if k in ("train", "freeze", "lora", "upcycle"):  # paths and calls, written as the spec writes them
            v = "[" + ", ".join(v) + "]"
        out[k] = fmt_value(v) if not isinstance(v, str) else v
    return out


def _stage_defaults() -> dict[str, str]:
    from vlmspec.compiler.schema.stage import Stage

    return _stage_fields(Stage(name="_"))


def diff_models(a: Analysis, b: Analysis, old_label: str | None = None, new_label: str | None = None) -> dict[str, Any]:
    """The architectural difference of two models. The labels name each side as the user did (`HEAD~1:x.vlm`),
    where the files alone would read the same."""
    sa, sb = summarise(a), summarise(b)
    ca, cb = a.ir.components, b.ir.components
    components = []
    for name in list(ca) + [n for n in cb if n not in ca]:
        if name not in cb:
            components.append({"name": name, "change": "removed", "role": ca[name].role, "kind": ca[name].kind,
                               "params": {"old": a.shapes.total(name), "new": 0}})
            continue
        if name not in ca:
            components.append({"name": name, "change": "added", "role": cb[name].role, "kind": cb[name].kind,
                               "params": {"old": 0, "new": b.shapes.total(name)},
                               "fields": {k: {"old": None, "new": v} for k, v in _fields(b, name).items()}})
            continue
        fa, fb = _fields(a, name), _fields(b, name)
        changed = {k: {"old": fa.get(k), "new": fb.get(k)} for k in list(fa) + [k for k in fb if k not in fa]
                   if fa.get(k) != fb.get(k)}
        pa, pb = a.shapes.total(name), b.shapes.total(name)
        ta, tb = a.shapes.out.get(name), b.shapes.out.get(name)
        if changed or pa != pb or str(ta) != str(tb):
            entry = {"name": name, "change": "changed", "role": cb[name].role, "kind": cb[name].kind,
                     "fields": changed, "params": {"old": pa, "new": pb}}
            if str(ta) != str(tb):
                entry["shape"] = {"old": str(ta) if ta else None, "new": str(tb) if tb else None}
            components.append(entry)

    stages = []
    st_a = {s.name: s for s in a.ir.stages}
    st_b = {s.name: s for s in b.ir.stages}
    tr_a = {s["name"]: s["params"]["trainable"] for s in sa["stages"]}
    tr_b = {s["name"]: s["params"]["trainable"] for s in sb["stages"]}
    for name in list(st_a) + [n for n in st_b if n not in st_a]:
        if name not in st_b:
            stages.append({"name": name, "change": "removed", "trainable": {"old": tr_a[name], "new": 0}})
        elif name not in st_a:
            stages.append({"name": name, "change": "added", "trainable": {"old": 0, "new": tr_b[name]},
                           "fields": {k: {"old": None, "new": v} for k, v in _stage_fields(st_b[name]).items()}})
        else:
            fa, fb = _stage_fields(st_a[name]), _stage_fields(st_b[name])
            changed = {k: {"old": fa[k], "new": fb[k]} for k in fa if fa[k] != fb[k]}
            entry = {"name": name, "change": "changed" if changed or tr_a[name] != tr_b[name] else "same",
                     "trainable": {"old": tr_a[name], "new": tr_b[name]}, "fields": changed}
            stages.append(entry)

    settings = {}
    for k in type(a.ir.settings).model_fields:
        va, vb = fmt_value(getattr(a.ir.settings, k)), fmt_value(getattr(b.ir.settings, k))
        if va != vb:
            settings[k] = {"old": va, "new": vb}

    return {
        "old": {"model": a.ir.name, "file": a.file, "label": old_label or f"{a.file}:{a.ir.name}"},
        "new": {"model": b.ir.name, "file": b.file, "label": new_label or f"{b.file}:{b.ir.name}"},
        "params": {"old": sa["params"]["total"], "new": sb["params"]["total"]},
        "components": components,
        "stages": stages,
        "settings": settings,
        "identical": not components and not settings and all(s["change"] == "same" for s in stages),
    }


def _signed(n: int) -> str:
    from vlmspec.compiler.summary import human

    return ("+" if n > 0 else "-" if n < 0 else "±") + human(abs(n))


def render_text(d: dict[str, Any]) -> str:
    """Plain-text diff for terminals, code review and git's textconv."""
    from vlmspec.compiler.summary import human

    lines = [f"--- {d['old']['label']}", f"+++ {d['new']['label']}"]
    if d["identical"]:
        lines.append("no architectural change")
        return "\n".join(lines) + "\n"
    po, pn = d["params"]["old"], d["params"]["new"]
    lines.append(f"parameters: {human(po)} -> {human(pn)} ({_signed(pn - po)})")
    for c in d["components"]:
        mark = {"added": "+", "removed": "-", "changed": "~"}[c["change"]]
        p = c["params"]
        head = f"{mark} {c['role']} {c['name']} ({c['kind']}) {c['change']}"
        if p["old"] != p["new"]:
            head += f"  params {human(p['old'])} -> {human(p['new'])} ({_signed(p['new'] - p['old'])})"
        lines.append(head)
        if "shape" in c:
            lines.append(f"    output: {c['shape']['old']} -> {c['shape']['new']}")
        if c["change"] == "changed":
            for k, v in c["fields"].items():
                lines.append(f"    {k}: {_side(v['old'])} -> {_side(v['new'])}")
        elif c["change"] == "added":  # a reviewer reads what the new part is, not only that it exists
            lines.extend(f"    {k} = {v['new']}" for k, v in c["fields"].items() if k != "kind")
    for k, v in d["settings"].items():
        lines.append(f"~ setting {k}: {v['old']} -> {v['new']}")
    for s in d["stages"]:
        if s["change"] == "same":
            continue
        mark = {"added": "+", "removed": "-", "changed": "~"}[s["change"]]
        t = s["trainable"]
        lines.append(f"{mark} stage {s['name']} {s['change']}  trainable {human(t['old'])} -> {human(t['new'])}"
                     f" ({_signed(t['new'] - t['old'])})")
        if s["change"] == "changed":
            for k, v in s["fields"].items():
                lines.append(f"    {k}: {_side(v['old'])} -> {_side(v['new'])}")
        elif s["change"] == "added":  # what it trains, freezes and adapts, and how (defaults left out)
            defaults = _stage_defaults()
            lines.extend(f"    {k} = {v['new']}" for k, v in s["fields"].items()
                         if k in ("train", "freeze", "lora") and v["new"] != "[]" or v["new"] != defaults.get(k))
    return "\n".join(lines) + "\n"


def _side(v: str | None) -> str:
    """One side of a change; a field only the other side's kind has is `(absent)`, not Python's None."""
    return "(absent)" if v is None else v

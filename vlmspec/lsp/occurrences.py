"""Every name written in a file, with what it names and where: the index under hover, definition,
references and symbols.

The AST keeps one span per node; a dotted path (`llm.attn`, `llm.width`) is one node, so its parts get
their own offsets here, found by reading the path's text (the grammar allows spaces around the dots).
Offsets are character offsets into the file's text, the one coordinate `LineIndex` converts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from vlmspec.compiler import ast
from vlmspec.diagnostics import Span

What = Literal["model", "component", "kind", "attr", "stage", "import", "field_ref", "subpath"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One written name. `owner` says whose it is: for an attribute the path of blocks it sits in
    (`("component", "llm", "moe")`, `("settings",)`, `("stage", "align")`); for a field reference or a
    sub-path, the component it reaches into."""

    what: What
    name: str
    start: int
    end: int
    model: str | None
    decl: bool = False
    role: str | None = None
    owner: tuple[str, ...] = ()


def _parts(source: str, span: Span, parts: list[str]) -> list[tuple[str, int, int]]:
    """(name, start, end) of each part of a dotted path written at `span`."""
    out, at = [], span.start
    for part in parts:
        m = _NAME.search(source, at, max(span.end, at))
        if m is None or m.group() != part:
            return out
        out.append((part, m.start(), m.end()))
        at = m.end()
    return out


def _value_refs(source: str, value: ast.Value, model: str, out: list[Occurrence]) -> None:
    """`llm.width` in a value: the component, then the field it reads."""
    stack: list[object] = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, ast.Ref) and len(v.parts) >= 2:
            parts = _parts(source, v.span, v.parts)
            if parts:
                comp, s, e = parts[0]
                out.append(Occurrence("component", comp, s, e, model))
                if len(parts) > 1:
                    name, s, e = parts[1]
                    out.append(Occurrence("field_ref", name, s, e, model, owner=(comp,)))
        elif isinstance(v, ast.ListVal):
            stack.extend(v.items)
        elif isinstance(v, ast.Call):
            stack.extend(a.value for a in v.args)
        elif isinstance(v, ast.BinOp):
            stack.extend((v.left, v.right))
        elif isinstance(v, ast.Neg):
            stack.append(v.operand)


def _block(source: str, block: ast.Block | None, owner: tuple[str, ...], model: str,
           out: list[Occurrence]) -> None:
    if block is None:
        return
    for item in block.items:
        out.append(Occurrence("attr", item.name, item.name_span.start, item.name_span.end, model, owner=owner))
        if isinstance(item, ast.Attr):
            _value_refs(source, item.value, model, out)
        else:
            _block(source, item.block, (*owner, item.name), model, out)


def _path(source: str, path: ast.Path, model: str, out: list[Occurrence]) -> None:
    parts = _parts(source, path.span, path.parts)
    if not parts:
        return
    comp, s, e = parts[0]
    out.append(Occurrence("component", comp, s, e, model))
    if len(parts) > 1:
        _, s2, _ = parts[1]
        _, _, e2 = parts[-1]
        out.append(Occurrence("subpath", ".".join(p for p, _, _ in parts[1:]), s2, e2, model, owner=(comp,)))


def _stage(source: str, st: ast.Stage, model: str, out: list[Occurrence]) -> None:
    out.append(Occurrence("stage", st.name, st.name_span.start, st.name_span.end, model, decl=True))
    if st.extends is not None:
        name, span = st.extends
        out.append(Occurrence("stage", name, span.start, span.end, model))
    for item in st.items:
        if isinstance(item, ast.TargetsStmt):
            for target in item.targets:
                _path(source, target.path, model, out)
        elif isinstance(item, ast.UpcycleStmt):
            _path(source, item.source, model, out)
            _path(source, item.dest, model, out)
        elif isinstance(item, ast.Attr):
            out.append(Occurrence("attr", item.name, item.name_span.start, item.name_span.end, model,
                                  owner=("stage", st.name)))


def occurrences(f: ast.File) -> list[Occurrence]:
    """Every name in the file, in source order."""
    out: list[Occurrence] = []
    src = f.source
    for item in f.items:
        if isinstance(item, ast.Import):
            out.append(Occurrence("import", item.path, item.span.start, item.span.end, None))
            continue
        m = item.name
        out.append(Occurrence("model", m, item.name_span.start, item.name_span.end, m, decl=True))
        if item.extends is not None:
            base, span = item.extends
            out.append(Occurrence("model", base, span.start, span.end, m))
        for it in item.items:
            if isinstance(it, ast.Component):
                out.append(Occurrence("component", it.name, it.name_span.start, it.name_span.end, m, decl=True,
                                      role=it.role))
                if it.kind is not None and it.kind_span is not None:
                    out.append(Occurrence("kind", it.kind, it.kind_span.start, it.kind_span.end, m, role=it.role))
                for name, span in it.sources:
                    out.append(Occurrence("component", name, span.start, span.end, m))
                if it.target is not None:
                    out.append(Occurrence("component", it.target[0], it.target[1].start, it.target[1].end, m))
                _block(src, it.block, ("component", it.name), m, out)
            elif isinstance(it, ast.Override):
                out.append(Occurrence("component", it.name, it.name_span.start, it.name_span.end, m))
                _block(src, it.block, ("component", it.name), m, out)
            elif isinstance(it, ast.Attr):
                out.append(Occurrence("attr", it.name, it.name_span.start, it.name_span.end, m, owner=("settings",)))
                _value_refs(src, it.value, m, out)
            elif isinstance(it, ast.Stage):
                _stage(src, it, m, out)
    out.sort(key=lambda o: o.start)
    return out


def at(occs: list[Occurrence], offset: int) -> Occurrence | None:
    """The name under the cursor: the one whose text contains `offset` or ends right at it."""
    best = None
    for o in occs:
        if o.start <= offset <= o.end and (best is None or o.end - o.start < best.end - best.start):
            best = o
    return best

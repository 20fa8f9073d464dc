"""Document symbols: the outline an editor shows (models, their components, overrides and stages)."""

from __future__ import annotations

from lsprotocol import types

from vlmspec.compiler import ast
from vlmspec.lsp.documents import Snapshot
from vlmspec.lsp.positions import LineIndex

_ROLE_KIND = {
    "vision": types.SymbolKind.Object,
    "audio": types.SymbolKind.Event,
    "text": types.SymbolKind.String,
    "connector": types.SymbolKind.Function,
    "language": types.SymbolKind.Module,
    "fusion": types.SymbolKind.Operator,
}


def _symbol(index: LineIndex, name: str, kind: types.SymbolKind, detail: str, span, name_span,
            children: list[types.DocumentSymbol] | None = None) -> types.DocumentSymbol:
    return types.DocumentSymbol(name=name, kind=kind, detail=detail, range=index.range(span.start, span.end),
                                selection_range=index.range(name_span.start, name_span.end), children=children)


def _model(index: LineIndex, m: ast.Model) -> types.DocumentSymbol:
    children = []
    for item in m.items:
        if isinstance(item, ast.Component):
            kind = item.kind or item.name
            children.append(_symbol(index, item.name, _ROLE_KIND[item.role], f"{item.role} {kind}", item.span,
                                    item.name_span))
        elif isinstance(item, ast.Override):
            children.append(_symbol(index, item.name, types.SymbolKind.Property, "override", item.span, item.name_span))
        elif isinstance(item, ast.Stage):
            detail = "stage" + (f" extends {item.extends[0]}" if item.extends else "")
            children.append(_symbol(index, item.name, types.SymbolKind.Event, detail, item.span, item.name_span))
    detail = f"extends {m.extends[0]}" if m.extends else "model"
    return _symbol(index, m.name, types.SymbolKind.Class, detail, m.span, m.name_span, children)


def document_symbols(snap: Snapshot) -> list[types.DocumentSymbol]:
    parsed = snap.parsed
    index = snap.index()
    if parsed is None or index is None:
        return []
    return [_model(index, m) for m in parsed.models]

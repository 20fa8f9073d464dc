"""Formatting: the canonical layout of `vlm fmt`, as one edit that replaces the document.

One whole-document edit rather than a minimal diff: the printer re-emits every line anyway, editors
apply a single edit atomically (one undo step), and a file that does not parse is left untouched (its
diagnostics already say why), exactly as `vlm fmt` refuses it.
"""

from __future__ import annotations

from lsprotocol import types

from vlmspec.compiler.printer import format_file
from vlmspec.lsp.diagnostics import encoding_problem
from vlmspec.lsp.documents import Snapshot


def format_document(snap: Snapshot) -> list[types.TextEdit]:
    parsed = snap.parsed
    index = snap.index()
    if parsed is None or index is None or encoding_problem(snap.path, snap.text) is not None:
        return []
    new = format_file(parsed)
    if new == snap.text:
        return []
    return [types.TextEdit(range=types.Range(start=types.Position(line=0, character=0), end=index.end()),
                           new_text=new)]

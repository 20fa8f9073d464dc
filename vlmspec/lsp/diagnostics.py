"""The compiler's diagnostics as LSP diagnostics: the same codes, messages and ranges as `vlm check`.

Three things need more than a field-by-field copy:

- a diagnostic located in a file that the open document imports (directly or through another import)
  is published on that file, and summarised at the `import` line of the open document that reaches it,
  so an error in a base model is visible where the model that extends it is being edited;
- a document that is not UTF-8: an editor has already decoded it before the server sees it, either with
  U+FFFD for the bad bytes (then the file on disk is read and the first bad byte located exactly as
  `vlm check` locates it) or with lone surrogates standing for raw bytes (a client that passes bytes
  through); either way the answer is E0004 at the first bad byte, and nothing else, as from `vlm check`;
- nothing raises: an exception inside the front end becomes one diagnostic that says it is a bug.
"""

from __future__ import annotations

import os
from pathlib import Path

from lsprotocol import types

from vlmspec.diagnostics import Diagnostic, Span
from vlmspec.grammar.parser import not_utf8
from vlmspec.lsp.documents import Snapshot, path_to_uri
from vlmspec.lsp.positions import LineIndex

SOURCE = "vlm"
INTERNAL = "internal"


def message_text(d: Diagnostic) -> str:
    """The message, then its help and notes on their own lines, as `vlm check` prints them below the caret."""
    lines = [d.message]
    if d.help:
        lines.append(f"help: {d.help}")
    lines.extend(f"note: {n}" for n in d.notes)
    return "\n".join(lines)


def to_lsp(d: Diagnostic, index: LineIndex) -> types.Diagnostic:
    rng = index.span_range(d.span) if d.span is not None else index.range(0, 0)
    severity = types.DiagnosticSeverity.Error if d.severity == "error" else types.DiagnosticSeverity.Warning
    return types.Diagnostic(range=rng, message=message_text(d), severity=severity, code=d.code, source=SOURCE)


def internal_error(err: BaseException) -> types.Diagnostic:
    zero = types.Position(line=0, character=0)
    return types.Diagnostic(
        range=types.Range(start=zero, end=zero), severity=types.DiagnosticSeverity.Error, code=INTERNAL,
        source=SOURCE, message=f"internal error in vlm lsp: {type(err).__name__}: {err}\n"
        "help: this is a bug in vlmspec; `vlm check` on the file may say more")


def encoding_problem(path: str, text: str) -> Diagnostic | None:
    """E0004 at the first byte of the document that is not UTF-8, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: raw bytes passed through by the client
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "surrogatepass")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            return not_utf8(path, err)[0]
        return None
    if "\ufffd" not in text:
        return None
    try:
        data = Path(path).read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as err:  # the editor showed the file's bad bytes as U+FFFD
        diag, shown = not_utf8(path, err)
        if shown == text:
            return diag
        at = text.index("\ufffd")  # edited since: point at the first replacement character left
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        return Diagnostic(diag.code, diag.message, Span(path, line, col, line, col + 1, at, at + 1), help=diag.help)
    except (OSError, ValueError):
        return None
    return None


def _import_site(snap: Snapshot, file: str, diags: list[Diagnostic]) -> types.Diagnostic | None:
    """One diagnostic at the entry's `import` that reaches `file`, summing up the errors found there."""
    errors = [d for d in diags if d.severity == "error"]
    imp = snap.project.top_import.get(file)
    index = snap.index()
    if not errors or imp is None or index is None:
        return None
    first = errors[0]
    shown = os.path.relpath(file, os.path.dirname(snap.path) or ".") if os.path.isabs(snap.path) else file
    through = "" if os.path.normpath(shown) == os.path.normpath(imp.path) else f", imported through `{imp.path}`"
    where = f"line {first.span.line}, column {first.span.col}: " if first.span is not None else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = f"`{shown}`{through} has {len(errors)} error{'s' if len(errors) != 1 else ''}{more}; " \
              f"the first, at {where}{first.message}"
    related = []
    other = snap.index(file)
    for d in errors:
        if other is not None and d.span is not None:
            loc = types.Location(uri=path_to_uri(file), range=other.span_range(d.span))
            related.append(types.DiagnosticRelatedInformation(location=loc, message=f"[{d.code}] {d.message}"))
    return types.Diagnostic(range=index.span_range(imp.span), message=message,
                            severity=types.DiagnosticSeverity.Error, code=first.code, source=SOURCE,
                            related_information=related or None)


def _diagnose(snap: Snapshot) -> dict[str, list[types.Diagnostic]]:
    entry_index = snap.index()
    if entry_index is None:  # unreachable: the document's own text is always known
        return {snap.path: []}
    bad = encoding_problem(snap.path, snap.text)
    if bad is not None:
        return {snap.path: [to_lsp(bad, entry_index)]}
    by_file: dict[str, list[Diagnostic]] = {}
    for d in snap.result.diagnostics:
        file = d.span.file if d.span is not None and d.span.file in snap.result.sources else snap.path
        by_file.setdefault(file, []).append(d)
    out: dict[str, list[types.Diagnostic]] = {snap.path: [to_lsp(d, entry_index) for d in by_file.pop(snap.path, [])]}
    for file, diags in by_file.items():
        index = snap.index(file)
        if index is not None:
            out[file] = [to_lsp(d, index) for d in diags]
        site = _import_site(snap, file, diags)
        if site is not None:
            out[snap.path].append(site)
    return out


def diagnose(snap: Snapshot) -> dict[str, list[types.Diagnostic]]:
    """Diagnostics by file path: the document's own (always a key, maybe empty), and those of the files
    it imports. Never raises."""
    try:
        return _diagnose(snap)
    except Exception as err:  # noqa: BLE001 - the editor gets a diagnostic, never a dead server
        return {snap.path: [internal_error(err)]}

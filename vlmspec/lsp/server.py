"""`vlm lsp`: the pygls wiring. Every feature lives in its own module; this one only connects them.

- Documents are synchronised in full (the client sends the whole text on each change): spec files
  are small, and it keeps the server's text identical to the editor's without replaying edits.
- Diagnostics run when a document opens, and on changes after a short quiet period (`DEBOUNCE_S`), so
  a burst of keystrokes costs one check; each publish carries the document version it describes.
  Imported files are read as saved (as `vlm check` reads them), so a save re-checks every open document.
- A handler never takes the server down: an exception becomes an empty answer (and a line on stderr),
  and `diagnostics.diagnose` turns its own into a diagnostic.
- Nothing here imports torch: the front end (`vlmspec.compiler`) is all the server needs, imported once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from vlmspec import __version__
from vlmspec.lsp.completion import complete
from vlmspec.lsp.definition import definition, references
from vlmspec.lsp.diagnostics import diagnose
from vlmspec.lsp.documents import Snapshot, path_to_uri
from vlmspec.lsp.formatting import format_document
from vlmspec.lsp.hover import hover
from vlmspec.lsp.symbols import document_symbols

log = logging.getLogger("vlmspec.lsp")

#: Quiet period after a change before the document is checked again (VLM_LSP_DEBOUNCE_MS overrides).
DEBOUNCE_S = float(os.environ.get("VLM_LSP_DEBOUNCE_MS", "50")) / 1000

T = TypeVar("T")


class VlmLanguageServer(LanguageServer):
    """The server's state: the open documents and a snapshot of each, pending checks, and which files each
    open document published diagnostics on (its imports), so that fixed errors are cleared there too."""

    def __init__(self) -> None:
        super().__init__("vlm-lsp", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Full)
        self.open: set[str] = set()
        self.snapshots: dict[str, Snapshot] = {}
        self.pending: dict[str, asyncio.TimerHandle] = {}
        self.published: dict[str, set[str]] = {}

    # ---------------------------------------------------------------- snapshots
    def encoding(self) -> str:
        try:
            kind = self.workspace.position_encoding or "utf-16"
        except RuntimeError:  # before `initialize`
            return "utf-16"
        return str(getattr(kind, "value", kind))  # an lsprotocol enum, or the client's string

    def snapshot(self, uri: str) -> Snapshot | None:
        """The document as the editor has it now; reused while its text is unchanged."""
        try:
            doc = self.workspace.get_text_document(uri)
            text = doc._source if doc._source is not None else None  # never let pygls read the disk itself
        except Exception:  # noqa: BLE001 - an unknown document
            return None
        if text is None:
            return None
        snap = self.snapshots.get(uri)
        if snap is None or snap.text != text or snap.encoding != self.encoding():
            snap = Snapshot(uri, text, doc.version, self.encoding())
            self.snapshots[uri] = snap
        else:
            snap.version = doc.version
        return snap

    # ---------------------------------------------------------------- diagnostics
    def publish(self, uri: str) -> None:
        self.pending.pop(uri, None)
        snap = self.snapshot(uri)
        if snap is None:
            return
        by_path = diagnose(snap)
        open_uris = self.open
        now: set[str] = set()
        for path, diags in by_path.items():
            target = uri if path == snap.path else path_to_uri(path)
            if target != uri and target in open_uris:
                continue  # an open file publishes its own diagnostics
            version = snap.version if target == uri else None
            self.text_document_publish_diagnostics(
                types.PublishDiagnosticsParams(uri=target, diagnostics=diags, version=version))
            if target != uri:
                now.add(target)
        stale = self.published.get(uri, set()) - now - open_uris - self._claimed(uri)
        for other in stale:
            self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=other, diagnostics=[]))
        self.published[uri] = now

    def _claimed(self, uri: str) -> set[str]:
        """Files that open documents other than `uri` published diagnostics on (a base file two import)."""
        return set().union(*(p for u, p in self.published.items() if u != uri))

    def schedule(self, uri: str, delay: float = DEBOUNCE_S) -> None:
        handle = self.pending.pop(uri, None)
        if handle is not None:
            handle.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (called outside the server): check now
            self.publish(uri)
            return
        self.pending[uri] = loop.call_later(delay, _guard(self.publish, None), uri)

    def close(self, uri: str) -> None:
        handle = self.pending.pop(uri, None)
        if handle is not None:
            handle.cancel()
        self.open.discard(uri)
        self.snapshots.pop(uri, None)
        for other in (self.published.pop(uri, set()) - self._claimed(uri)) | {uri}:
            if other not in self.open:
                self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=other, diagnostics=[]))


def _guard(fn: Callable[..., T], default: T | Callable[[], T]) -> Callable[..., T]:
    """Run a handler; on any exception log it to stderr and answer `default` instead."""

    @functools.wraps(fn)
    def run(*args: Any) -> T:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the editor keeps its server whatever one request does
            log.exception("vlm lsp: %s failed", getattr(fn, "__name__", "handler"))
            return default() if callable(default) else default

    return run


def build() -> VlmLanguageServer:
    """The server with every feature registered."""
    server = VlmLanguageServer()

    def feature(name: str, options: Any = None, default: Any = None) -> Callable:
        def register(fn: Callable) -> Callable:
            guarded = _guard(fn, default)
            return server.feature(name, options)(guarded) if options is not None else server.feature(name)(guarded)

        return register

    @feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: VlmLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
        ls.open.add(params.text_document.uri)
        ls.snapshots.pop(params.text_document.uri, None)
        ls.publish(params.text_document.uri)

    @feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: VlmLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
        ls.schedule(params.text_document.uri)

    @feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: VlmLanguageServer, params: types.DidSaveTextDocumentParams) -> None:
        for uri in list(ls.open):  # imports are read from disk: a save may change what others see
            ls.snapshots.pop(uri, None)
            ls.schedule(uri)

    @feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: VlmLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
        ls.close(params.text_document.uri)

    @feature(types.TEXT_DOCUMENT_HOVER)
    def on_hover(ls: VlmLanguageServer, params: types.HoverParams) -> types.Hover | None:
        snap = ls.snapshot(params.text_document.uri)
        return hover(snap, params.position) if snap is not None else None

    @feature(types.TEXT_DOCUMENT_COMPLETION,
             types.CompletionOptions(trigger_characters=[".", "=", "(", ",", " "]),
             default=lambda: types.CompletionList(is_incomplete=False, items=[]))
    def on_completion(ls: VlmLanguageServer, params: types.CompletionParams) -> types.CompletionList:
        snap = ls.snapshot(params.text_document.uri)
        return complete(snap, params.position) if snap is not None else \
            types.CompletionList(is_incomplete=False, items=[])

    @feature(types.TEXT_DOCUMENT_DEFINITION, default=list)
    def on_definition(ls: VlmLanguageServer, params: types.DefinitionParams) -> list[types.Location]:
        snap = ls.snapshot(params.text_document.uri)
        return definition(snap, params.position) if snap is not None else []

    @feature(types.TEXT_DOCUMENT_REFERENCES, default=list)
    def on_references(ls: VlmLanguageServer, params: types.ReferenceParams) -> list[types.Location]:
        snap = ls.snapshot(params.text_document.uri)
        if snap is None:
            return []
        others = [s for u in list(ls.open) if u != snap.uri and (s := ls.snapshot(u)) is not None]
        return references(snap, params.position, params.context.include_declaration, others)

    @feature(types.TEXT_DOCUMENT_FORMATTING, default=list)
    def on_formatting(ls: VlmLanguageServer, params: types.DocumentFormattingParams) -> list[types.TextEdit]:
        snap = ls.snapshot(params.text_document.uri)
        return format_document(snap) if snap is not None else []

    @feature(types.TEXT_DOCUMENT_DOCUMENT_SYMBOL, default=list)
    def on_symbols(ls: VlmLanguageServer, params: types.DocumentSymbolParams) -> list[types.DocumentSymbol]:
        snap = ls.snapshot(params.text_document.uri)
        return document_symbols(snap) if snap is not None else []

    return server


def serve() -> None:
    """Speak LSP on stdin/stdout until the client says `exit`. Logs go to stderr, never to stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    build().start_io()

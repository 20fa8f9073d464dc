"""One open document at one version, and what the front end knows about it, computed once.

Diagnostics, hover, completion and definition all need the same things (the check result, the
syntax trees of the file and its imports, a position table), so a `Snapshot` computes each lazily and
keeps it until the text changes; a hover right after the debounced check costs no second check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlparse

from vlmspec.compiler import ast
from vlmspec.compiler.compile import Analysis, CheckResult, check_file
from vlmspec.lsp.occurrences import Occurrence, occurrences
from vlmspec.lsp.positions import LineIndex
from vlmspec.lsp.project import Project, load_project, parse_or_none


def uri_to_path(uri: str) -> str:
    """A file URI's path (what the compiler reports spans in); other URIs (`untitled:`) stay as they are."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return uri
    path = unquote(parsed.path)
    if os.name == "nt" and len(path) > 2 and path[0] == "/" and path[2] == ":":
        path = path[1:]
    return os.path.normpath(path)


def path_to_uri(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if "://" in path or path.startswith("untitled:"):
        return path
    return "file://" + quote(os.path.abspath(path).replace(os.sep, "/"), safe="/:")


@dataclass(slots=True)
class Snapshot:
    uri: str
    text: str
    version: int | None = None
    encoding: str = "utf-16"
    path: str = ""
    _result: CheckResult | None = None
    _project: Project | None = None
    _indexes: dict[str, LineIndex] = field(default_factory=dict)
    _occurrences: dict[str, list[Occurrence]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.path:
            self.path = uri_to_path(self.uri)

    # ---------------------------------------------------------------- front end
    @property
    def result(self) -> CheckResult:
        """What `vlm check` reports for this text (imports read from disk, as `vlm check` reads them)."""
        if self._result is None:
            self._result = check_file(self.path, text=self.text)
        return self._result

    @property
    def project(self) -> Project:
        if self._project is None:
            sources = self._result.sources if self._result is not None else None
            self._project = load_project(self.path, self.text, sources)
        return self._project

    @property
    def parsed(self) -> ast.File | None:
        return parse_or_none(self.text, self.path)

    def analysis(self, model: str) -> Analysis | None:
        return next((a for a in self.result.analyses if a.ir.name == model), None)

    # ---------------------------------------------------------------- positions
    def source_of(self, path: str) -> str | None:
        if path == self.path:
            return self.text
        f = self.project.files.get(path)
        if f is not None:
            return f.source
        if self._result is not None:
            return self._result.sources.get(path)
        return None

    def index(self, path: str | None = None) -> LineIndex | None:
        path = path or self.path
        if path not in self._indexes:
            text = self.source_of(path)
            if text is None:
                return None
            self._indexes[path] = LineIndex(text, self.encoding)
        return self._indexes[path]

    def occurrences(self, path: str | None = None) -> list[Occurrence]:
        path = path or self.path
        if path not in self._occurrences:
            f = self.project.files.get(path)
            self._occurrences[path] = occurrences(f) if f is not None else []
        return self._occurrences[path]

    def kinds(self, model: str | None) -> dict[str, tuple[str, str]]:
        """Component name -> (role, kind) as `model` sees them (its own and inherited components)."""
        if model is None:
            return {}
        return {name: (c.role, c.kind or c.name) for name, c in self.project.components(model).items()}

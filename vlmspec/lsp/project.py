"""The parsed files an open document reaches through `import`, and where each name is declared.

The compiler's resolver answers "what does this model mean"; an editor also asks "where was this
written": which model in an `extends` chain declares a component, sets an attribute or defines a stage.
`Project` answers that from the syntax trees alone, so hover, go to definition and references still
work on a model whose later passes fail.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from vlmspec.compiler import ast
from vlmspec.diagnostics import VlmSpecError
from vlmspec.grammar.parser import parse


@functools.lru_cache(maxsize=64)
def parse_or_none(text: str, path: str) -> ast.File | None:
    """The syntax tree of `text`, or None when it does not parse (the diagnostics say why).

    Cached by text: hover, completion and definition on an unchanged document parse it once."""
    try:
        return parse(text, path)
    except VlmSpecError:
        return None
    except (RecursionError, ValueError, OverflowError):  # the parser refuses these itself; belt and braces
        return None


def import_path(importer: str, written: str) -> str:
    """Where an `import "x.vlm"` in file `importer` points: the resolver's own rule (relative to the file)."""
    return os.path.normpath(str(FsPath(importer).parent / written))


def read_text(path: str) -> str | None:
    try:
        return FsPath(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None


@dataclass(slots=True)
class Project:
    """An entry file, every file it imports (transitively) and the models they define (first one wins,
    as the resolver reports a second definition as E0102)."""

    entry: str
    files: dict[str, ast.File] = field(default_factory=dict)
    models: dict[str, tuple[ast.Model, str]] = field(default_factory=dict)
    top_import: dict[str, ast.Import] = field(default_factory=dict)  # file -> the entry's import reaching it

    def lineage(self, name: str) -> list[tuple[ast.Model, str]]:
        """The model and its bases, nearest first; stops at an unknown base or a cycle."""
        chain: list[tuple[ast.Model, str]] = []
        seen: set[str] = set()
        current = self.models.get(name)
        while current is not None and current[0].name not in seen:
            chain.append(current)
            seen.add(current[0].name)
            base = current[0].extends
            current = self.models.get(base[0]) if base is not None else None
        return chain

    def component_decl(self, model: str, comp: str) -> tuple[ast.Component, str, str] | None:
        """(declaration, file, model) of component `comp` as model `model` sees it."""
        for m, path in self.lineage(model):
            for item in m.items:
                if isinstance(item, ast.Component) and item.name == comp:
                    return item, path, m.name
        return None

    def stage_decl(self, model: str, stage: str) -> tuple[ast.Stage, str, str] | None:
        for m, path in self.lineage(model):
            for item in m.items:
                if isinstance(item, ast.Stage) and item.name == stage:
                    return item, path, m.name
        return None

    def components(self, model: str) -> dict[str, ast.Component]:
        """Every component model `model` has, declared in it or inherited."""
        out: dict[str, ast.Component] = {}
        for m, _ in reversed(self.lineage(model)):
            for item in m.items:
                if isinstance(item, ast.Component):
                    out[item.name] = item
        return out

    def stages(self, model: str) -> list[str]:
        names: dict[str, None] = {}
        for m, _ in reversed(self.lineage(model)):
            for item in m.items:
                if isinstance(item, ast.Stage):
                    names[item.name] = None
        return list(names)

    def attr_site(self, model: str, comp: str, name: str) -> tuple[ast.Attr | ast.Override, str, str] | None:
        """Where model `model` gets attribute `name` of component `comp`: the nearest model in its
        `extends` chain that writes it (in the declaration or in an override block)."""
        for m, path in self.lineage(model):
            for item in reversed(m.items):  # a later block in the same model wins, as in the resolver
                block = None
                if isinstance(item, ast.Component) and item.name == comp:
                    block = item.block
                elif isinstance(item, ast.Override) and item.name == comp:
                    block = item.block
                if block is None:
                    continue
                for entry in block.items:
                    if entry.name == name:
                        return entry, path, m.name
        return None

    def model_at(self, path: str, offset: int) -> ast.Model | None:
        f = self.files.get(path)
        if f is None:
            return None
        return next((m for m in f.models if m.span.start <= offset <= m.span.end), None)


def load_project(entry: str, text: str, sources: dict[str, str] | None = None) -> Project:
    """Parse `text` (as `entry`) and what it imports; imported files come from `sources` (what the
    check read) or else from disk. Files that do not parse are left out."""
    project = Project(entry)
    sources = sources or {}
    queue: list[tuple[str, str | None, ast.Import | None]] = [(entry, text, None)]
    seen: set[str] = set()
    while queue:
        path, body, top = queue.pop(0)
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            continue
        seen.add(key)
        if body is None:
            body = sources.get(path)
        if body is None:
            body = read_text(path)
        parsed = parse_or_none(body, path) if body is not None else None
        if parsed is None:
            continue
        project.files[path] = parsed
        for m in parsed.models:
            project.models.setdefault(m.name, (m, path))
        for imp in parsed.imports:
            target = import_path(path, imp.path)
            reach = top if top is not None else imp
            project.top_import.setdefault(target, reach)
            queue.append((target, None, reach))
    return project

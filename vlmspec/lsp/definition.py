"""Go to definition and find references: components, models (`extends`), stages, imports, `llm.width`.

A name means what the resolver would make of it: a component named in a derived model is the one its
`extends` chain declares, so "definition" may jump into a base model in an imported file, and two
occurrences are references to the same thing when they resolve to the same declaration (a key of
kind, file and offset), not merely when they are spelled alike.

References are searched in the document, the files it imports, and the other open documents with
theirs (a base file's model is referenced from the files that import it, which only the editor knows).
"""

from __future__ import annotations

from collections.abc import Iterable

from lsprotocol import types

from vlmspec.lsp.documents import Snapshot, path_to_uri
from vlmspec.lsp.occurrences import Occurrence, at
from vlmspec.lsp.project import import_path

Key = tuple[str, str, int]


def _decl(snap: Snapshot, path: str, occ: Occurrence) -> tuple[str, int, int] | None:
    """(file, start, end) of the declaration `occ` (written in file `path`) refers to."""
    project = snap.project
    if occ.what == "component" and occ.model:
        found = project.component_decl(occ.model, occ.name)
        if found is not None:
            node, file, _ = found
            return file, node.name_span.start, node.name_span.end
    elif occ.what == "model":
        entry = project.models.get(occ.name)
        if entry is not None:
            return entry[1], entry[0].name_span.start, entry[0].name_span.end
    elif occ.what == "stage" and occ.model:
        found_stage = project.stage_decl(occ.model, occ.name)
        if found_stage is not None:
            node_s, file, _ = found_stage
            return file, node_s.name_span.start, node_s.name_span.end
    elif occ.what == "field_ref" and occ.model:
        comp = occ.owner[0]
        site = project.attr_site(occ.model, comp, occ.name)
        if site is not None:
            return site[1], site[0].name_span.start, site[0].name_span.end
        found = project.component_decl(occ.model, comp)  # a default: the component says where it comes from
        if found is not None:
            return found[1], found[0].name_span.start, found[0].name_span.end
    elif occ.what == "import":
        return import_path(path, occ.name), 0, 0
    return None


def _location(snap: Snapshot, file: str, start: int, end: int) -> types.Location | None:
    index = snap.index(file)
    if index is None:  # a file outside the project (an import that does not parse): its first line
        zero = types.Position(line=0, character=0)
        return types.Location(uri=path_to_uri(file), range=types.Range(start=zero, end=zero))
    return types.Location(uri=path_to_uri(file), range=index.range(start, end))


def definition(snap: Snapshot, pos: types.Position) -> list[types.Location]:
    index = snap.index()
    if index is None or snap.parsed is None:
        return []
    occ = at(snap.occurrences(), index.offset(pos))
    if occ is None:
        return []
    target = _decl(snap, snap.path, occ)
    if target is None:
        return []
    loc = _location(snap, *target)
    return [loc] if loc is not None else []


def references(snap: Snapshot, pos: types.Position, include_declaration: bool,
               others: Iterable[Snapshot] = ()) -> list[types.Location]:
    index = snap.index()
    if index is None or snap.parsed is None:
        return []
    occ = at(snap.occurrences(), index.offset(pos))
    if occ is None or occ.what not in ("component", "model", "stage"):
        return []
    key = _decl(snap, snap.path, occ)
    if key is None:
        return []
    out: list[types.Location] = []
    seen: set[tuple[str, int]] = set()
    for s in (snap, *others):
        for file in list(s.project.files):
            if (file, -1) in seen:
                continue
            seen.add((file, -1))
            for o in s.occurrences(file):
                if o.what != occ.what or o.name != occ.name or (o.decl and not include_declaration):
                    continue
                if _decl(s, file, o) == key and (file, o.start) not in seen:
                    seen.add((file, o.start))
                    loc = _location(s, file, o.start, o.end)
                    if loc is not None:
                        out.append(loc)
    return out

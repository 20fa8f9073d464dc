"""Completion while typing: kinds for a role, attributes for a kind, enum values, component names in
flows, stage paths (`llm.attn`), stage statements, models after `extends`.

A document being typed rarely parses, so completion reads the text, not the syntax tree: comments and
strings are blanked out (`mask`), the open `{` blocks before the cursor say where it is (a model, a
component of some kind, a nested `moe { }` block, a stage), and the current statement's text says
what comes next. Names of components, models and stages are read the same way from the document and
from the files it imports, so they are offered even when the document is mid-edit. Every answer comes
from the schema classes (`schema_info`), the one place attributes are declared.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from lsprotocol import types

from vlmspec.compiler.schema import REGISTRY, ROLES, Settings, Stage
from vlmspec.compiler.schema.stage import OBJECTIVES, STAGE_ATTRS
from vlmspec.lsp.documents import Snapshot
from vlmspec.lsp.positions import LineIndex
from vlmspec.lsp.project import import_path, read_text
from vlmspec.lsp.schema_info import (
    STAGE_STATEMENTS,
    field_doc,
    kind_summary,
    literals,
    nested_schema,
    optimizers,
    schema_for,
)

_MASK = re.compile(r'(?P<comment>#[^\n]*)|"(?:[^"\\\n]|\\.)*(?P<closed>")?')
_COMPONENT = re.compile(r"\b(vision|connector|language)\s+(\w+)\s*=\s*(\w+)|\bfusion\s+(\w+)(?:\s*=\s*(\w+))?")
_IMPORT = re.compile(r'^\s*import\s+"([^"\n]*)"', re.M)
_MODEL = re.compile(r"\bmodel\s+(\w+)")
_STAGE = re.compile(r"\bstage\s+(\w+)")
_HEADERS = (
    ("model", re.compile(r"\bmodel\s+(\w+)(?:\s+extends\s+\w+)?\s*$")),
    ("stage", re.compile(r"\bstage\s+(\w+)(?:\s+extends\s+\w+)?\s*$")),
    ("component", re.compile(r"\b(vision|connector|language|fusion)\s+(\w+)(?:\s*=\s*(\w+))?\s*(?:\([^(){}]*\))?\s*$")),
    ("block", re.compile(r"(\w+)\s*$")),
)
_DONE = re.compile(r"(?:=\s*[^=\s{}(,]+|[}\])]|\b(?:batch|epochs|steps)\s+\d+|\b(?:train|freeze|lora)\s+[\w.]+"
                   r"(?:\([^()]*\))?|\b(?:optim|data|precision|objective)\s+\S+)\s+$")


#: How much of a statement or block header before the cursor is read: the patterns look at its end only,
#: and a bound keeps them linear on the megabyte lines of the fuzz corpus.
TAIL = 256


def mask(text: str) -> str:
    """`text` with comments and string contents replaced by spaces (lengths and newlines kept)."""
    return _MASK.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


@dataclass(slots=True)
class Context:
    """Where the cursor is: the open blocks around it, the statement text before the word, the word."""

    blocks: list[tuple[str, ...]]
    before: str
    word: str
    word_start: int
    in_comment_or_string: bool = False
    model: str | None = None


def context(text: str, offset: int) -> Context:
    prefix = text[:offset]
    tail = collections.deque(_MASK.finditer(prefix), maxlen=1)  # the last comment or string before the cursor
    last = tail[0] if tail else None
    inside = last is not None and last.end() == offset and (last["comment"] is not None or last["closed"] is None)
    masked = mask(prefix)
    blocks: list[tuple[str, ...]] = []
    opens: list[int] = []
    boundary = 0
    for m in re.finditer(r"[{}]", masked):
        if m.group() == "{":
            blocks.append(_classify(masked[max(boundary, m.start() - TAIL):m.start()]))
            opens.append(m.start())
        elif blocks:
            blocks.pop()
            opens.pop()
        boundary = m.end()
    start = max(masked.rfind("\n") + 1, opens[-1] + 1 if opens else 0)
    line = masked[start:]
    at = len(line)  # the word is found by a backward scan: a regex anchored at `$` is quadratic on long names
    while at > 0 and (line[at - 1].isalnum() or line[at - 1] in "_."):
        at -= 1
    model = next((b[1] for b in blocks if b[0] == "model"), None)
    return Context(blocks, line[max(0, at - TAIL):at], line[at:], start + at, inside, model)


def _classify(header: str) -> tuple[str, ...]:
    for what, pattern in _HEADERS:
        m = pattern.search(header)
        if m is None:
            continue
        if what == "component":
            role, name, kind = m.group(1), m.group(2), m.group(3)
            return ("component", role, name, kind or name)
        return (what, m.group(1))
    return ("block", "")


# ---------------------------------------------------------------- names from the text


@dataclass(slots=True)
class Names:
    """Components (name -> (role, kind)), models and stages written in the document and its imports."""

    components: dict[str, tuple[str, str]] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


def names(path: str, text: str, limit: int = 32) -> Names:
    out = Names()
    queue, seen = [(path, text)], set()
    texts: list[str] = []
    while queue and len(seen) < limit:
        p, body = queue.pop(0)
        if p in seen or body is None:
            continue
        seen.add(p)
        texts.append(mask(body))
        queue.extend((import_path(p, rel), read_text(import_path(p, rel))) for rel in _IMPORT.findall(body))
    for masked in reversed(texts):  # the document's own declarations win
        for m in _COMPONENT.finditer(masked):
            if m.group(1):
                out.components[m.group(2)] = (m.group(1), m.group(3))
            else:
                out.components[m.group(4)] = ("fusion", m.group(5) or m.group(4))
        out.models.extend(n for n in _MODEL.findall(masked) if n not in out.models)
        out.stages.extend(n for n in _STAGE.findall(masked) if n not in out.stages)
    return out


# ---------------------------------------------------------------- items


def _md(text: str) -> types.MarkupContent:
    return types.MarkupContent(kind=types.MarkupKind.Markdown, value=text)


def _item(label: str, kind: types.CompletionItemKind, detail: str, doc: str, rng: types.Range,
          insert: str | None = None, order: int = 0) -> types.CompletionItem:
    return types.CompletionItem(label=label, kind=kind, detail=detail, documentation=_md(doc) if doc else None,
                                text_edit=types.TextEdit(range=rng, new_text=insert or label),
                                filter_text=label, sort_text=f"{order:02d}{label}")


def _attributes(cls: type, rng: types.Range, where: str) -> list[types.CompletionItem]:
    out = []
    attrs = STAGE_ATTRS if cls is Stage else tuple(cls.model_fields)
    for name in attrs:
        doc = field_doc(cls, name)
        if doc is None:
            continue
        nested = nested_schema(cls.model_fields[name].annotation) is not None
        detail = doc.type + (f", default {doc.default}" if doc.default is not None else "")
        text = f"{doc.description}\n\n{where}" if doc.description else where
        out.append(_item(name, types.CompletionItemKind.Property, detail, text, rng,
                         insert=f"{name} {{ " if nested else f"{name} = "))
    return out


def _kinds(role: str, rng: types.Range) -> list[types.CompletionItem]:
    out = []
    for kind in REGISTRY.kinds(role):
        cls = REGISTRY.get(role, kind)
        out.append(_item(kind, types.CompletionItemKind.Class, f"{role} kind", kind_summary(cls) if cls else "", rng))
    return out


def _values(cls: type | None, attr: str, rng: types.Range) -> list[types.CompletionItem]:
    info = cls.model_fields.get(attr) if cls is not None else None
    if info is None:
        return []
    values = literals(info.annotation)
    ann = str(info.annotation)
    if info.annotation is bool:
        values = ["true", "false"]
    elif "None" in ann and "none" not in values:
        values.append("none")
    return [_item(v, types.CompletionItemKind.EnumMember, f"{attr} value", info.description or "", rng)
            for v in values]


def _component_items(comps: dict[str, tuple[str, str]], roles: tuple[str, ...],
                     rng: types.Range) -> list[types.CompletionItem]:
    return [_item(n, types.CompletionItemKind.Variable, f"{role} {kind}", "", rng)
            for n, (role, kind) in comps.items() if role in roles]


def _subpaths(snap: Snapshot, ctx: Context, comp: str, kind: tuple[str, str] | None) -> list[str]:
    analysis = snap.analysis(ctx.model) if ctx.model and snap.parsed is not None else None
    if analysis is not None and comp in analysis.ir.components:
        return analysis.ir.components[comp].config.subpaths()
    cls = REGISTRY.get(*kind) if kind is not None else None
    if cls is None:
        return []
    try:
        return cls.model_construct().subpaths()
    except Exception:  # noqa: BLE001 - a kind whose defaults cannot say: offer no sub-paths
        return []


def _paths(snap: Snapshot, ctx: Context, found: Names, index: LineIndex, offset: int) -> list[types.CompletionItem]:
    rng = index.range(ctx.word_start, offset)
    if "." in ctx.word:
        comp = ctx.word.split(".")[0]
        kind = found.components.get(comp)
        return [_item(f"{comp}.{p}", types.CompletionItemKind.Field, f"part of {comp}", "", rng)
                for p in _subpaths(snap, ctx, comp, kind)]
    items = _component_items(found.components, ROLES, rng)
    if any(role == "fusion" for role, _ in found.components.values()):
        items.append(_item("fusion", types.CompletionItemKind.Variable, "every fusion component", "", rng))
    return items


def _statement_start(ctx: Context) -> bool:
    before = ctx.before
    return not before.strip() or before.rstrip().endswith("{") or bool(_DONE.search(before))


def _keywords(words: dict[str, str], rng: types.Range, order: int = 1) -> list[types.CompletionItem]:
    return [_item(w, types.CompletionItemKind.Keyword, "keyword", doc, rng, order=order) for w, doc in words.items()]


def _in_block(ctx: Context, found: Names, rng: types.Range) -> list[types.CompletionItem]:
    """Completions inside the innermost open block, by what it is."""
    top = ctx.blocks[-1]
    owner = _owner(ctx)
    cls = schema_for(owner, found.components) if owner else None
    value = re.search(r"(\w+)\s*=\s*$", ctx.before)
    if "." in ctx.word and re.search(r"(^|[=+\-*/(,\[])\s*$", ctx.before):  # `llm.wi` in a value
        comp = ctx.word.split(".")[0]
        kind = found.components.get(comp)
        comp_cls = REGISTRY.get(*kind) if kind is not None else None
        return _attributes(comp_cls, rng, f"`{kind[1]}` attribute") if comp_cls and kind else []
    if value is not None:
        return _values(cls, value.group(1), rng)
    if top[0] == "stage":
        b = ctx.before  # (paths after `train`, `freeze`, `lora`, `upcycle` are the caller's: `_paths`)
        if re.search(r"\boptim\s+$", b):
            return _keywords({o: "optimizer" for o in optimizers()}, rng)
        if re.search(r"\bprecision\s+$", b):
            return _keywords({p: "autocast precision" for p in literals(Stage.model_fields["precision"].annotation)}, rng)
        if re.search(r"\bobjective\s+(?:[\w.*\s]+\+\s*)?$", b):
            return _keywords({o: "loss term" for o in OBJECTIVES}, rng)
        if re.search(r"\bdata\s+$", b):
            return _keywords({"llava": 'a LLaVA conversation file: `llava("train.json", images = "imgs/")`',
                              "captions": 'an image-caption JSONL file: `captions("captions.jsonl")`'}, rng)
        if re.search(r"\bextends\s+$", b):
            return []
        if _statement_start(ctx):
            return _keywords(STAGE_STATEMENTS, rng) + _attributes(Stage, rng, "stage attribute")
        return []
    if top[0] == "model":
        if _statement_start(ctx):
            roles = {r: f"declare a {r} component: `{r} NAME = KIND ...`" for r in ROLES}
            roles["stage"] = "a training stage: `stage NAME { train ...  freeze ... }`"
            return (_keywords(roles, rng) + _attributes(Settings, rng, "model setting")
                    + [_item(n, types.CompletionItemKind.Variable, f"override {role} {kind}", "", rng, order=2)
                       for n, (role, kind) in found.components.items()])
        return []
    if cls is not None and _statement_start(ctx):
        where = f"`{found.components[owner[1]][1]}` attribute" if owner and owner[0] == "component" \
            and owner[1] in found.components else "attribute"
        return _attributes(cls, rng, where)
    return []


def _owner(ctx: Context) -> tuple[str, ...] | None:
    """The schema owner of the innermost block, as `schema_for` takes it."""
    owner: tuple[str, ...] | None = None
    for b in ctx.blocks:
        if b[0] == "model":
            owner = ("settings",)
        elif b[0] == "stage":
            owner = ("stage", b[1])
        elif b[0] == "component":
            owner = ("component", b[2])
        elif owner is not None and owner[0] == "settings":
            owner = ("component", b[1])  # `clip { ... }` in a model: an override of component `clip`
        elif owner is not None and owner[0] == "component":
            owner = (*owner, b[1])  # a nested block such as `moe { ... }`
        else:
            owner = None
    return owner


def complete(snap: Snapshot, pos: types.Position) -> types.CompletionList:
    index = snap.index()
    empty = types.CompletionList(is_incomplete=False, items=[])
    if index is None:
        return empty
    offset = index.offset(pos)
    ctx = context(snap.text, offset)
    if ctx.in_comment_or_string:
        return empty
    found = names(snap.path, snap.text)
    rng = index.range(ctx.word_start + (ctx.word.rfind(".") + 1 if "." in ctx.word else 0), offset)
    b = ctx.before
    items: list[types.CompletionItem]
    header = re.search(r"\b(vision|connector|language|fusion)\s+\w+\s*=\s*$", b) or re.search(r"\b(fusion)\s+$", b)
    flow = re.search(r"\b(vision|connector|language|fusion)\s+(\w+)(?:\s*=\s*\w+)?\s*\(([^(){}]*)$", b)
    if header is not None:
        items = _kinds(header.group(1), rng)
    elif flow is not None:
        roles = ("connector", "language") if "->" in flow.group(3) else ("vision", "connector")
        others = {n: rk for n, rk in found.components.items() if n != flow.group(2)}  # not itself
        items = _component_items(others, roles, rng)
    elif (ext := re.search(r"\bmodel\s+(\w+)\s+extends\s+$", b)) is not None:
        items = [_item(m, types.CompletionItemKind.Class, "model", "", rng) for m in found.models if m != ext.group(1)]
    elif (st := re.search(r"\bstage\s+(\w+)\s+extends\s+$", b)) is not None:
        items = [_item(s, types.CompletionItemKind.Event, "stage", "", rng) for s in found.stages if s != st.group(1)]
    elif not ctx.blocks:
        items = _keywords({"model": "a model: `model NAME [extends BASE] { ... }`",
                           "import": 'models from another file: `import "base.vlm"`'}, rng) \
            if not b.strip() else []
    elif ctx.blocks[-1][0] == "stage" and (
            re.search(r"\b(train|freeze|lora)\s+(?:[\w.]+\s*(?:\([^()]*\))?\s*,\s*)*$", b)
            or re.search(r"\bupcycle\s+(?:[\w.]+\s*->\s*)?$", b)):
        items = _paths(snap, ctx, found, index, offset)
    else:
        items = _in_block(ctx, found, rng)
    return types.CompletionList(is_incomplete=False, items=items)


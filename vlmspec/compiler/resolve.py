"""AST -> typed IR: imports, `extends` and overrides, references such as `llm.width`, defaults.

Resolution is where names get meaning. It reports every problem it finds (unknown names with a
`did you mean`, type and range errors located on the attribute that caused them) before giving up.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import BaseModel, ValidationError

from vlmspec.compiler import ast
from vlmspec.compiler.ir import Component, ModelIR, SpanTable, resolved_value
from vlmspec.compiler.schema import REGISTRY, ROLES, CallValue, ComponentSchema, Settings, Stage
from vlmspec.compiler.schema.stage import NAME_ATTRS, OBJECTIVES, STAGE_ATTRS, LoraSpec
from vlmspec.diagnostics import DiagnosticSink, Span, SpecSyntaxError, did_you_mean
from vlmspec.grammar.parser import MAX_DIGITS, not_utf8, parse

# ------------------------------------------------------------------ workspace (files and imports)


Reader = Callable[[str], str | None]


@dataclass(slots=True)
class Workspace:
    """Every file reachable from the entry file through `import`, and the models they define.

    Files are keyed by their display path (as written on the command line or joined from imports);
    `seen` holds their canonical paths so one file reached two ways is loaded once.
    """

    entry: str
    files: dict[str, ast.File] = field(default_factory=dict)
    models: dict[str, tuple[ast.Model, ast.File]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    @property
    def sources(self) -> dict[str, str]:
        return {path: f.source for path, f in self.files.items()}

    def models_in(self, path: str) -> list[str]:
        return [m.name for m in self.files[path].models]


def _read_disk(path: str) -> str | None:
    fs = FsPath(path)
    return fs.read_text(encoding="utf-8") if fs.is_file() else None


def load_workspace(path: str, sink: DiagnosticSink, text: str | None = None, reader: Reader | None = None) -> Workspace:
    """Parse `path` (or `text`, reported as `path`) and its imports. Syntax errors land in `sink`.

    `reader` reads imported files (default: from disk); `vlm diff REV:file` passes one that reads the
    same git revision, so a spec and its bases are compared as they were.
    """
    ws = Workspace(entry=path)
    _load(ws, path, text, sink, None, reader or _read_disk)
    return ws


def _canonical(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _load(ws: Workspace, path: str, text: str | None, sink: DiagnosticSink, at: Span | None, reader: Reader) -> None:
    key = _canonical(path)
    if key in ws.seen:
        return
    ws.seen.add(key)
    try:
        if text is None:
            text = reader(path)
            if text is None:
                if at is None:
                    sink.error("E0004", f"cannot read `{path}`: no such file")
                else:
                    sink.error("E0106", f"cannot find file `{path}`", at,
                               help="import paths are relative to the importing file")
                return
        parsed = parse(text, path)
    except SpecSyntaxError as err:
        sink.items.extend(err.diagnostics)
        ws.files[path] = ast.File(path, text or "", [])
        return
    except UnicodeDecodeError as err:
        diag, shown = not_utf8(path, err)
        if at is None:
            sink.items.append(diag)
            ws.files[path] = ast.File(path, shown, [])  # the renderer shows the line of the bad byte
        else:
            sink.error("E0106", f"cannot read `{path}`: not UTF-8 text ({diag.span})", at)
        return
    except OSError as err:
        sink.error("E0004" if at is None else "E0106", f"cannot read `{path}`: {err.strerror or err}", at)
        return
    ws.files[path] = parsed
    for model in parsed.models:
        if model.name in ws.models:
            prev = ws.models[model.name][0]
            sink.error("E0102", f"model `{model.name}` is defined twice", model.name_span,
                       notes=[f"first defined at {prev.name_span}"])
            continue
        ws.models[model.name] = (model, parsed)
    base = FsPath(path).parent
    for imp in parsed.imports:
        _load(ws, os.path.normpath(str(base / imp.path)), None, sink, imp.span, reader)


# ------------------------------------------------------------------ merged (untyped) model


@dataclass(slots=True)
class _Nested:
    entries: dict[str, ast.Attr | _Nested]
    span: Span


@dataclass(slots=True)
class _RawComponent:
    role: str
    name: str
    kind: str
    sources: list[tuple[str, Span]]
    target: tuple[str, Span] | None
    attrs: dict[str, ast.Attr | _Nested]
    span: Span
    kind_span: Span | None


def _merge_block(into: dict[str, ast.Attr | _Nested], block: ast.Block, sink: DiagnosticSink) -> None:
    seen: set[str] = set()
    for item in block.items:
        name = item.name
        if name in seen:
            sink.error("E0102", f"`{name}` is set twice in the same block", item.name_span)
            continue
        seen.add(name)
        if isinstance(item, ast.Attr):
            into[name] = item
        else:
            existing = into.get(name)
            nested = existing if isinstance(existing, _Nested) else _Nested({}, item.span)
            nested.span = item.span
            _merge_block(nested.entries, item.block, sink)
            into[name] = nested


# ------------------------------------------------------------------ resolution


class _EvalFailed(Exception):
    """An expression could not be evaluated; the diagnostic is already in the sink."""


@dataclass(slots=True)
class Resolved:
    ir: ModelIR | None
    spans: SpanTable
    workspace: Workspace


class _Resolver:
    def __init__(self, ws: Workspace, model: ast.Model, sink: DiagnosticSink):
        self.ws = ws
        self.model = model
        self.sink = sink
        self.spans = SpanTable(model=model.name_span)
        self.raw: dict[str, _RawComponent] = {}
        self.settings: dict[str, ast.Attr] = {}
        self.stages: dict[str, ast.Stage] = {}
        self.typed: dict[str, ComponentSchema | None] = {}
        self.in_progress: list[str] = []
        self.field_stack: list[tuple[str, str]] = []

    # -------------------------------------------------------------- extends + overrides
    def lineage(self) -> list[ast.Model]:
        chain = [self.model]
        seen = {self.model.name}
        current = self.model
        while current.extends is not None:
            base_name, span = current.extends
            if base_name in seen:
                self.sink.error("E0107", f"`extends` forms a cycle: {' -> '.join([m.name for m in chain] + [base_name])}",
                                span)
                break
            entry = self.ws.models.get(base_name)
            if entry is None:
                self.sink.error("E0103", f"unknown model `{base_name}`", span,
                                help=did_you_mean(base_name, self.ws.models) or _known("models", self.ws.models))
                break
            current = entry[0]
            chain.append(current)
            seen.add(base_name)
        return chain

    def merge(self, chain: list[ast.Model]) -> None:
        for model in reversed(chain):
            names_here: set = set()
            for item in model.items:
                if isinstance(item, ast.Component):
                    self._add_component(item, names_here)
                elif isinstance(item, ast.Override):
                    self._override(item)
                elif isinstance(item, ast.Attr):
                    self.settings[item.name] = item
                elif isinstance(item, ast.Stage):
                    if ("stage", item.name) in names_here:
                        self.sink.error("E0102", f"stage `{item.name}` is defined twice", item.name_span)
                        continue
                    names_here.add(("stage", item.name))
                    self.stages[item.name] = item  # a derived model's stage replaces the base's, in place

    def _add_component(self, item: ast.Component, names_here: set) -> None:
        role = item.role
        if item.kind is None:
            if role != "fusion":
                self.sink.error("E0105", f"{role} component `{item.name}` has no kind", item.name_span,
                                help=f"write `{role} {item.name} = KIND ...`; {_known('kinds', REGISTRY.kinds(role))}")
                return
            name, kind, kind_span = item.name, item.name, item.name_span
        else:
            name, kind, kind_span = item.name, item.kind, item.kind_span
        if name in names_here:
            self.sink.error("E0102", f"component `{name}` is defined twice in model `{self.model.name}`", item.name_span)
            return
        names_here.add(name)
        if REGISTRY.get(role, kind) is None:
            self.sink.error("E0105", f"unknown {role} kind `{kind}`", kind_span,
                            help=KNOWN_AS.get((role, kind.lower())) or did_you_mean(kind, REGISTRY.kinds(role))
                            or _known("kinds", REGISTRY.kinds(role)))
            return
        attrs: dict[str, ast.Attr | _Nested] = {}
        if item.block is not None:
            _merge_block(attrs, item.block, self.sink)
        self.raw[name] = _RawComponent(role, name, kind, list(item.sources), item.target, attrs, item.span, kind_span)

    def _override(self, item: ast.Override) -> None:
        comp = self.raw.get(item.name)
        if comp is None:
            self.sink.error("E0101", f"no component `{item.name}` to override", item.name_span,
                            help=did_you_mean(item.name, self.raw) or _known("components", self.raw))
            return
        _merge_block(comp.attrs, item.block, self.sink)

    # -------------------------------------------------------------- values
    def eval(self, value: ast.Value, owner: str, names_as_strings: bool = False) -> Any:
        if isinstance(value, ast.Int | ast.Float | ast.Str | ast.Bool):
            return value.value
        if isinstance(value, ast.ListVal):
            return [self.eval(v, owner, names_as_strings) for v in value.items]
        if isinstance(value, ast.Ref):
            if len(value.parts) == 1 or names_as_strings:
                return BareName(value.dotted)
            return self.reference(value, owner)
        if isinstance(value, ast.Call):
            args = tuple(self.eval(a.value, owner, names_as_strings) for a in value.args if a.name is None)
            kwargs = tuple((a.name, self.eval(a.value, owner, names_as_strings)) for a in value.args if a.name)
            return CallValue(value.name, args, kwargs, tuple(value.attrs))
        if isinstance(value, ast.Neg):
            x = self.eval(value.operand, owner)
            if not _is_number(x):
                self.sink.error("E0201", "only numbers can be negated", value.span)
                raise _EvalFailed
            return -x
        if isinstance(value, ast.BinOp):
            left, right = self.eval(value.left, owner), self.eval(value.right, owner)
            if not (_is_number(left) and _is_number(right)):
                self.sink.error("E0201", f"`{value.op}` needs numbers on both sides", value.span)
                raise _EvalFailed
            if value.op == "/" and right == 0:
                self.sink.error("E0202", "division by zero", value.span)
                raise _EvalFailed
            try:
                if value.op == "+":
                    result = left + right
                elif value.op == "-":
                    result = left - right
                elif value.op == "*":
                    result = left * right
                elif isinstance(left, int) and isinstance(right, int) and left % right == 0:
                    result = left // right
                else:
                    result = left / right
            except OverflowError:  # a whole number too large to meet a float
                result = None
            if result is None or (isinstance(result, int) and abs(result) >= _TOO_LARGE):
                self.sink.error("E0212", f"`{value.op}` gives a number of more than {MAX_DIGITS} digits", value.span,
                                help="no spec value comes near; check the arithmetic")
                raise _EvalFailed
            return result
        raise _EvalFailed  # unreachable: the parser builds only the node types above

    def reference(self, ref: ast.Ref, owner: str) -> Any:
        comp_name, *fields = ref.parts
        if comp_name not in self.raw:
            self.sink.error("E0109", f"`{ref.dotted}` refers to an unknown component `{comp_name}`", ref.span,
                            help=did_you_mean(comp_name, self.raw) or _known("components", self.raw))
            raise _EvalFailed
        if comp_name in self.in_progress:
            if comp_name == self.in_progress[-1] and len(fields) == 1:
                return self._sibling_field(comp_name, fields[0], ref)
            cycle = [*self.in_progress[self.in_progress.index(comp_name):], comp_name]
            self.sink.error("E0108", f"references form a cycle: {' -> '.join(cycle)}", ref.span)
            raise _EvalFailed
        cfg = self.component(comp_name)
        if cfg is None:
            raise _EvalFailed
        value: Any = cfg
        for i, f in enumerate(fields):
            fields_here = type(value).model_fields if isinstance(value, BaseModel) else {}
            if f not in fields_here:
                options = list(fields_here)
                self.sink.error("E0109", f"`{'.'.join([comp_name, *fields[: i + 1]])}` is not a field", ref.span,
                                help=did_you_mean(f, options) or _known("fields", options))
                raise _EvalFailed
            value = resolved_value(value, f) if isinstance(value, ComponentSchema) else getattr(value, f)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        return value

    def _sibling_field(self, comp_name: str, field_name: str, ref: ast.Ref) -> Any:
        """`llm.width` used inside `llm` itself: the written value, or the schema's default."""
        raw = self.raw[comp_name]
        entry = raw.attrs.get(field_name)
        key = (comp_name, field_name)
        if isinstance(entry, ast.Attr):
            if key in self.field_stack:
                self.sink.error("E0108", f"`{ref.dotted}` refers to itself", ref.span)
                raise _EvalFailed
            self.field_stack.append(key)
            try:
                return self.eval(entry.value, comp_name)
            finally:
                self.field_stack.pop()
        cls = REGISTRY.get(raw.role, raw.kind)
        info = cls.model_fields.get(field_name) if cls is not None else None
        if info is None or info.default is None:
            options = list(cls.model_fields) if cls is not None else []
            self.sink.error("E0109", f"`{ref.dotted}` has no value to refer to here", ref.span,
                            help=did_you_mean(field_name, options) if info is None else
                            f"write `{field_name} = ...` in `{comp_name}` first")
            raise _EvalFailed
        return info.default

    def _eval_entries(self, entries: dict[str, ast.Attr | _Nested], owner: str,
                      spans: dict[tuple[str, ...], Span], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, entry in entries.items():
            key = (*prefix, name)
            if isinstance(entry, _Nested):
                spans[key] = entry.span
                out[name] = self._eval_entries(entry.entries, owner, spans, key)
                continue
            spans[key] = entry.value.span
            spans[(*key, "<name>")] = entry.name_span
            try:
                out[name] = self.eval(entry.value, owner)
            except _EvalFailed:
                out[name] = _FAILED
        return out

    # -------------------------------------------------------------- components
    def component(self, name: str) -> ComponentSchema | None:
        if name in self.typed:
            return self.typed[name]
        raw = self.raw[name]
        self.in_progress.append(name)
        try:
            spans: dict[tuple[str, ...], Span] = {}
            values = self._eval_entries(raw.attrs, name, spans)
            for key, span in spans.items():
                if key and key[-1] != "<name>":
                    self.spans.attrs[(name, ".".join(key))] = span
            cls = REGISTRY.get(raw.role, raw.kind)
            result = None
            if cls is not None and not _has_failed(values):
                result = _validate(cls, values, spans, self.sink, f"{raw.role} `{name}` ({raw.kind})")
            self.typed[name] = result
            return result
        finally:
            self.in_progress.pop()

    # -------------------------------------------------------------- stages
    def stage(self, st: ast.Stage, built: dict[str, dict[str, Any]], chain: tuple[str, ...] = ()) -> dict[str, Any] | None:
        if st.name in built:
            return built[st.name]
        data: dict[str, Any] = {"name": st.name, "train": [], "freeze": [], "lora": [], "upcycle": []}
        if st.extends is not None:
            parent_name, span = st.extends
            data["extends"] = parent_name
            if parent_name in chain or parent_name == st.name:
                cycle = " -> ".join((*chain, st.name, parent_name)) if chain else f"{st.name} -> {parent_name}"
                self.sink.error("E0404", f"stage `extends` forms a cycle: {cycle}", span)
                return None
            parent = self.stages.get(parent_name)
            if parent is None:
                self.sink.error("E0404", f"stage `{st.name}` extends unknown stage `{parent_name}`", span,
                                help=did_you_mean(parent_name, self.stages) or _known("stages", self.stages))
                return None
            parent_data = self.stage(parent, built, (*chain, st.name))
            if parent_data is None:
                return None
            data = copy.deepcopy(parent_data)
            data["name"], data["extends"] = st.name, parent_name
        self.spans.stages[st.name] = st.name_span
        spans: dict[tuple[str, ...], Span] = {}
        ok = True
        for item in st.items:
            try:
                self._stage_item(st.name, item, data, spans)
            except _EvalFailed:
                ok = False
        if not ok:
            return None
        validated = _validate(Stage, data, spans, self.sink, f"stage `{st.name}`")
        if validated is None:
            return None
        built[st.name] = data
        return data

    def _stage_item(self, stage: str, item: ast.StageItem, data: dict[str, Any], spans: dict) -> None:
        owner = f"stage:{stage}"
        if isinstance(item, ast.TargetsStmt):
            for target in item.targets:
                path = target.path.dotted
                self.spans.stage_items[(stage, f"{item.keyword}:{path}")] = target.path.span
                kwargs: dict[str, Any] = {}
                for arg in target.args or []:
                    if arg.name is None:
                        self.sink.error("E0201", f"`{item.keyword}` arguments are named, e.g. `{path}(lr = 1e-4)`",
                                        arg.span)
                        raise _EvalFailed
                    kwargs[arg.name] = self.eval(arg.value, owner, names_as_strings=True)
                allowed = {"train": {"lr"}, "freeze": set(), "lora": set(LoraSpec.model_fields) - {"path"}}[item.keyword]
                for key in kwargs:
                    if key not in allowed:
                        span = next(a.span for a in target.args or [] if a.name == key)
                        self.sink.error("E0104", f"`{item.keyword}` takes no argument `{key}`", span,
                                        help=did_you_mean(key, allowed) or _known("arguments", allowed))
                        raise _EvalFailed
                data["train"] = [t for t in data["train"] if t["path"] != path]
                data["freeze"] = [f for f in data["freeze"] if f != path]
                if item.keyword == "train":
                    data["lora"] = [lo for lo in data["lora"] if lo["path"] != path]
                    data["train"].append({"path": path, **kwargs})
                elif item.keyword == "freeze":
                    data["freeze"].append(path)
                    data["lora"] = [lo for lo in data["lora"] if lo["path"] != path]
                else:
                    data["lora"] = [lo for lo in data["lora"] if lo["path"] != path]
                    data["lora"].append({"path": path, **kwargs})
                    spans[("lora",)] = target.span
        elif isinstance(item, ast.ValueStmt):
            spans[(item.keyword,)] = item.value.span
            self.spans.stage_items[(stage, item.keyword)] = item.span
            if item.keyword == "objective":
                data["objective"] = self._objective(item.value)
            else:
                data[item.keyword] = self.eval(item.value, owner)
        elif isinstance(item, ast.UpcycleStmt):
            data["upcycle"].append({"source": item.source.dotted, "dest": item.dest.dotted})
            self.spans.stage_items[(stage, "upcycle")] = item.span
        elif isinstance(item, ast.Attr):
            if item.name not in STAGE_ATTRS:
                keywords = ["train", "freeze", "lora", "optim", "data", "batch", "epochs", "steps", "precision",
                            "objective", "upcycle"]
                hint = did_you_mean(item.name, list(STAGE_ATTRS))
                if item.name in keywords:
                    hint = f"`{item.name}` is a statement: write `{item.name} VALUE` without `=`"
                self.sink.error("E0104", f"unknown stage attribute `{item.name}`", item.name_span,
                                help=hint or _known("stage attributes", STAGE_ATTRS))
                raise _EvalFailed
            spans[(item.name,)] = item.value.span
            self.spans.stage_items[(stage, item.name)] = item.value.span
            if isinstance(item.value, ast.ListVal):  # a list of names (`activation_checkpointing = [llm]`)
                for v in item.value.items:
                    if isinstance(v, ast.Ref):
                        self.spans.stage_items[(stage, f"{item.name}:{v.dotted}")] = v.span
            data[item.name] = self.eval(item.value, owner, names_as_strings=item.name in NAME_ATTRS)

    def _objective(self, value: ast.Value) -> list[dict[str, Any]]:
        terms: list[dict[str, Any]] = []

        def walk(v: ast.Value) -> None:
            if isinstance(v, ast.BinOp) and v.op == "+":
                walk(v.left)
                walk(v.right)
                return
            weight, term = 1.0, v
            if isinstance(v, ast.BinOp) and v.op == "*" and isinstance(v.left, ast.Int | ast.Float):
                weight, term = float(v.left.value), v.right
            if isinstance(term, ast.Ref) and len(term.parts) == 1 and term.parts[0] in OBJECTIVES:
                terms.append({"name": term.parts[0], "weight": weight})
                return
            if isinstance(term, ast.Ref):
                msg = f"unknown objective `{term.dotted}`"
            else:
                msg = "an objective term is a name, optionally weighted first: `0.5 * itg`"
            hint = did_you_mean(term.dotted, OBJECTIVES) if isinstance(term, ast.Ref) else None
            self.sink.error("E0408", msg, term.span,
                            help=hint or "objectives are lm, itc, itm, itg and contrastive, combined with `+`, "
                            "e.g. `itc + itm + 0.5 * itg`")
            raise _EvalFailed

        walk(value)
        return terms

    # -------------------------------------------------------------- the whole model
    def run(self) -> ModelIR | None:
        chain = self.lineage()
        self.merge(chain)
        for name, raw in self.raw.items():
            self.spans.components[name] = raw.span
            for src, span in raw.sources:
                self.spans.flows[(name, src)] = span
            if raw.target is not None:
                self.spans.flows[(name, raw.target[0])] = raw.target[1]
        components: dict[str, Component] = {}
        for name, raw in self.raw.items():
            cfg = self.component(name)
            if cfg is None:
                continue
            components[name] = Component(name=name, role=raw.role, kind=raw.kind,
                                         sources=[s for s, _ in raw.sources],
                                         target=raw.target[0] if raw.target else None, config=cfg)
        settings_spans: dict[tuple[str, ...], Span] = {}
        settings_values = self._eval_entries(dict(self.settings), "model", settings_spans)
        for key, span in settings_spans.items():
            if key[-1] != "<name>":
                self.spans.attrs[("model", ".".join(key))] = span
        settings = None
        if not _has_failed(settings_values):
            settings = _validate(Settings, settings_values, settings_spans, self.sink, f"model `{self.model.name}`")
            if settings is not None and settings.boxes is not None:  # grounding: E0294-E0298
                where = lambda k: settings_spans.get(("boxes", k)) or settings_spans.get(("boxes",))  # noqa: E731
                settings.boxes.check(self.sink, where)
                settings.boxes.check_encoders(self.sink, where, components)
        built: dict[str, dict[str, Any]] = {}
        stages = []
        for st in self.stages.values():
            data = self.stage(st, built)
            if data is not None:
                stages.append(Stage.model_validate(data))
        if self.sink.has_errors or settings is None:
            return None
        return ModelIR(name=self.model.name, lineage=[m.name for m in chain], components=components,
                       settings=settings, stages=stages)


_FAILED = object()


def _has_failed(values: Any) -> bool:
    if values is _FAILED:
        return True
    if isinstance(values, dict):
        return any(_has_failed(v) for v in values.values())
    return False


_TOO_LARGE = 10 ** MAX_DIGITS


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _known(what: str, options) -> str:
    opts = sorted(options)
    if not opts:
        return f"there are no {what} here"
    return f"known {what}: " + ", ".join(f"`{o}`" for o in opts)


def _validate(cls: type, values: dict[str, Any], spans: dict[tuple[str, ...], Span], sink: DiagnosticSink,
              what: str) -> Any:
    """Validate with pydantic and translate each of its errors into a located diagnostic."""
    bad = _strict_scalars(cls, values, spans, sink)
    try:
        validated = cls.model_validate({k: v for k, v in values.items() if k not in bad})
        return None if bad else validated
    except ValidationError as err:
        errors = err.errors(include_url=False)
        written = set(values) | {name for key in spans for name in key}  # names the user wrote
        for e in errors:
            # a value missing inside a list element (`pinpoints = [[32]]`) is a malformed value, not a missing field
            e["in_element"] = any(isinstance(p, int) for p in e["loc"])
            e["loc"] = tuple(p for p in e["loc"] if not isinstance(p, int)
                             and not (_is_union_tag(str(p)) and str(p) not in written))
        errors = _one_branch(errors)
        seen: set[tuple] = set()
        for e in errors:
            key = (e["loc"], e["type"])
            if key in seen:
                continue
            seen.add(key)
            loc = tuple(str(p) for p in e["loc"])
            if loc[:1] and loc[0] in bad or (e["type"] == "missing" and loc[:1] and loc[0] in bad):
                continue
            field_name = loc[0] if loc else ""
            span = None
            for n in range(len(loc), 0, -1):
                span = spans.get(loc[:n])
                if span is not None:
                    break
            kind = e["type"]
            if kind == "extra_forbidden":
                model_cls = _field_owner(cls, loc[:-1])
                options = list(getattr(model_cls, "model_fields", {}))
                name_span = spans.get((*loc, "<name>")) or span
                sink.error("E0104", f"unknown attribute `{loc[-1]}` for {what}", name_span,
                           help=did_you_mean(loc[-1], options) or _known("attributes", options))
            elif kind == "missing" and e["in_element"]:
                sink.error("E0201", f"`{'.'.join(loc)}`: too few values", span,
                           help=_field_help(cls, loc))
            elif kind == "missing":
                sink.error("E0210", f"{what} needs `{'.'.join(loc)}`", spans.get(()) or span)
            elif kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                          "too_short", "too_long"}:
                sink.error("E0202", f"`{'.'.join(loc)}` {e['msg'].lower()} (got {_show(e.get('input'))})", span)
            else:
                msg = e["msg"]
                if msg.startswith("Value error, "):
                    msg = msg[len("Value error, "):]
                sink.error("E0201", f"`{'.'.join(loc) or field_name}`: {_humanise(msg)} (got {_show(e.get('input'))})",
                           span, help=_field_help(cls, loc))
        return None


def _branch_mismatch(e: dict[str, Any]) -> bool:
    """An error that says only that a call is another branch of a union field ("expected 'fixed'", "expected
    `anyres(...)` or `fixed`"), not what is wrong inside the branch the user wrote."""
    return len(e["loc"]) == 1 and isinstance(e.get("input"), CallValue) and (
        e["type"] == "literal_error" or (e["type"] == "value_error" and "expected `" in e["msg"]))


def _one_branch(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a union field (`rope = default | mrope(...)`, `layout = fixed | anyres(...) | split(...)`), report
    the branch the user meant: drop the other branches' "expected ..." when the call itself had a more
    specific problem; when it had none (an unknown call), one error naming every branch."""
    specific = {e["loc"][:1] for e in errors if not _branch_mismatch(e)}
    out: list[dict[str, Any]] = []
    merged: dict[tuple, dict[str, Any]] = {}
    for e in errors:
        if not _branch_mismatch(e):
            out.append(e)
            continue
        if e["loc"][:1] in specific:
            continue
        alts = re.findall(r"`([^`]+)`", e["msg"]) if e["type"] == "value_error" else \
            [str(e.get("ctx", {}).get("expected", "")).strip("'")]
        first = merged.get(e["loc"])
        if first is None:
            merged[e["loc"]] = {**e, "type": "value_error", "alts": alts}
            out.append(merged[e["loc"]])
        else:
            first["alts"] += [a for a in alts if a not in first["alts"]]
    for e in merged.values():
        alts = [a for a in e.pop("alts") if a]
        e["msg"] = "expected " + (", ".join(f"`{a}`" for a in alts[:-1]) + f" or `{alts[-1]}`"
                                  if len(alts) > 1 else f"`{alts[0]}`")
    return out


def _is_union_tag(part: str) -> bool:
    """pydantic names union branches in error locations (`literal['default']`, `MRoPE`): not user fields."""
    return "[" in part or "(" in part or part[:1].isupper()


#: Model names people write as a kind, and how the language says them (`language llm = qwen2 { ... }`).
KNOWN_AS: dict[tuple[str, str], str] = {
    **{("language", k): f"{k} is a `llama` (`language llm = llama {{ ... }}`)"
       for k in ("vicuna", "llama2", "llama3", "yi", "internlm", "deepseek")},
    ("language", "mistral"): "mistral is a `llama` (a Mistral checkpoint whose sliding window is shorter than its "
                             "context is refused when imported: a `llama` attends to the whole context)",
    **{("language", k): f"{k} is a `llama` with `qkv_bias = true` (the small Qwen2 models also set "
                        "`tie_embeddings = true`)" for k in ("qwen", "qwen2", "qwen2_5")},
    ("language", "phi2"): "Phi-1 / Phi-2 is a `phi`",
    ("language", "phi3"): "Phi-3 is a `llama`; `vlm import-hf` splits its fused tensors when it loads them",
    ("language", "gemma2"): "Gemma 2 (soft-capping, sliding windows) is not supported yet; Gemma 1 is a `gemma`",
    ("vision", "clip"): "CLIP's vision tower is a `vit` (`vision clip = vit { ... }`)",
    ("vision", "siglip2"): "SigLIP 2 at a fixed resolution is a `siglip`",
    ("vision", "eva_clip"): "EVA-CLIP is an `eva`",
}


class BareName(str):
    """A value written as a bare name (`act = gelu`, `weights = none`), not as a quoted string."""


def _strict_scalars(cls: type, values: dict[str, Any], spans: dict[tuple[str, ...], Span],
                    sink: DiagnosticSink) -> set[str]:
    """What pydantic's lax mode would get wrong: refuse `true` for a number, `1` for a boolean and `"48"`
    for a number; take a whole `1e3` as the integer 1000 (as language.md says); and a bare `none` for a
    field that may be unset (`weights = none` in a derived model) as unset. Updates `values` in place.

    Returns the fields that were refused (already reported)."""
    bad: set[str] = set()
    for name, value in list(values.items()):
        info = getattr(cls, "model_fields", {}).get(name)
        if info is None:
            continue
        ann = info.annotation
        options = set(getattr(ann, "__args__", (ann,)))
        if isinstance(value, BareName) and value == "none" and type(None) in options and not _allows(ann, "none"):
            values[name] = None
        elif bool in options and not isinstance(value, bool) and not options & {int, float, str} \
                and not (isinstance(value, str) and _allows(ann, value)) \
                and not (isinstance(value, list) and any(getattr(o, "__origin__", None) is list for o in options)):
            allowed = ", ".join(f"`{v}`" for v in ("true", *_literals(ann)))
            if any(getattr(o, "__origin__", None) is list for o in options):  # `activation_checkpointing`
                sink.error("E0201", f"`{name}` must be {allowed}, `false` or a list (got {_show(value)})",
                           spans.get((name,)), help=f"write `{name} = [{value}]`" if isinstance(value, str) else None)
            else:
                sink.error("E0201", f"`{name}` must be {allowed} or `false` (got {_show(value)})", spans.get((name,)))
            bad.add(name)
        elif options & {int, float} and not options & {str} and isinstance(value, str) and not _allows(ann, value):
            number = re.fullmatch(r"\s*-?\d+(\.\d*)?([eE]-?\d+)?\s*", value)
            sink.error("E0201", f"`{name}` must be a number (got {_show(value)})", spans.get((name,)),
                       help=f"write `{name} = {value.strip()}`, without quotes" if number
                       else _field_help(cls, (name,)))
            bad.add(name)
        elif int in options and float not in options and isinstance(value, float) and value.is_integer() \
                and not isinstance(value, bool):
            values[name] = int(value)
        elif int in options and float not in options and (
                isinstance(value, float) or (isinstance(value, bool) and bool not in options)):
            if isinstance(value, bool) or not options & {bool}:
                sink.error("E0201", f"`{name}` must be a whole number (got {_show(value)})", spans.get((name,)))
                bad.add(name)
        elif float in options and isinstance(value, bool):
            sink.error("E0201", f"`{name}` must be a number (got {_show(value)})", spans.get((name,)))
            bad.add(name)
    return bad


def _literals(ann: Any) -> list[str]:
    """The `Literal[...]` strings a field's type admits (`norm = rms` besides `true` / `false`)."""
    args = getattr(ann, "__args__", ())
    return [a for a in args if isinstance(a, str)] + [x for a in args if not isinstance(a, str) for x in _literals(a)]


def _allows(ann: Any, literal: str) -> bool:
    """Whether a field's type admits the string `literal` as one of its `Literal[...]` values."""
    args = getattr(ann, "__args__", ())
    return any(a == literal if isinstance(a, str) else _allows(a, literal) for a in args)


def _field_owner(cls: type, loc: tuple[str, ...]) -> type:
    current = cls
    for part in loc:
        field_info = getattr(current, "model_fields", {}).get(part)
        if field_info is None:
            return current
        ann = field_info.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            if hasattr(candidate, "model_fields"):
                current = candidate
                break
    return current


def _field_help(cls: type, loc: tuple[str, ...]) -> str | None:
    if not loc:
        return None
    owner = _field_owner(cls, loc[:-1])
    info = getattr(owner, "model_fields", {}).get(loc[-1])
    if info is None or not info.description:
        return None
    return f"`{loc[-1]}`: {info.description}"


def _humanise(msg: str) -> str:
    msg = msg.replace("Input should be", "expected").replace("input_value", "value")
    return msg[0].lower() + msg[1:] if msg else msg


def _show(v: Any) -> str:
    if isinstance(v, CallValue):
        return f"{v.name}(...)"
    if isinstance(v, dict):
        return "{ ... }"
    text = json.dumps(str(v)) if isinstance(v, str) else repr(v)  # as the spec writes it: "48"
    return text if len(text) < 40 else text[:37] + "..."


def resolve_model(ws: Workspace, model_name: str, sink: DiagnosticSink) -> Resolved:
    model, _file = ws.models[model_name]
    resolver = _Resolver(ws, model, sink)
    ir = resolver.run()
    return Resolved(ir, resolver.spans, ws)


__all__ = ["ROLES", "Resolved", "Workspace", "load_workspace", "resolve_model"]

"""`vlm fmt`: the canonical layout of a .vlm file, comments kept.

Canonical means: two-space indentation, one statement per line, `name = value` with single spaces,
at most one blank line where the author left one, comments kept where they were (own-line comments
before the statement that follows them, trailing comments after the statement on their line).
Printing works on the AST, so formatting never changes meaning: `parse(fmt(x))` has the IR of `x`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlmspec.compiler import ast
from vlmspec.compiler.schema.base import quote

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_BLANK = re.compile(r"\n[ \t]*\n")


def value_text(v: ast.Value) -> str:
    if isinstance(v, ast.Int | ast.Float):
        return v.text
    if isinstance(v, ast.Str):
        return v.text
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.ListVal):
        return "[" + ", ".join(value_text(x) for x in v.items) + "]"
    if isinstance(v, ast.Ref):
        return v.dotted
    if isinstance(v, ast.Call):
        return v.name + args_text(v.args) + "".join("." + a for a in v.attrs)
    if isinstance(v, ast.Neg):
        inner = value_text(v.operand)
        return "-(" + inner + ")" if isinstance(v.operand, ast.BinOp) else "-" + inner
    if isinstance(v, ast.BinOp):
        prec = _PREC[v.op]
        left = value_text(v.left)
        right = value_text(v.right)
        if isinstance(v.left, ast.BinOp) and _PREC[v.left.op] < prec:
            left = f"({left})"
        if isinstance(v.right, ast.BinOp) and _PREC[v.right.op] <= prec:
            right = f"({right})"
        return f"{left} {v.op} {right}"
    raise TypeError(f"not a value: {v!r}")


def args_text(args: list[ast.Arg]) -> str:
    return "(" + ", ".join((f"{a.name} = " if a.name else "") + value_text(a.value) for a in args) + ")"


@dataclass(slots=True)
class _Printer:
    source: str
    comments: list[ast.Comment]
    lines: list[str] = field(default_factory=list)
    next_comment: int = 0
    last_end: int = 0  # source offset where the last emitted unit (or comment) ended
    last_end_line: int = 0  # source line of that end
    after_open: bool = True  # the previous line opened a block (or the file): no blank line here

    def _blank_between(self, start: int) -> bool:
        return bool(_BLANK.search(self.source, self.last_end, start)) if start > self.last_end else False

    def _flush_comments(self, before: int, indent: int) -> None:
        while self.next_comment < len(self.comments) and self.comments[self.next_comment].span.start < before:
            c = self.comments[self.next_comment]
            self.next_comment += 1
            if c.span.line == self.last_end_line and self.lines and not self.after_open_line_is_blank():
                self.lines[-1] += "  " + c.text
            else:
                if self._blank_between(c.span.start) and not self.after_open:
                    self.lines.append("")
                self.lines.append("  " * indent + c.text)
                self.after_open = False
            self.last_end = c.span.end
            self.last_end_line = c.span.line

    def _flush_trailing(self, before: int) -> None:
        """Attach a comment on the line of the last statement before moving on to a new model."""
        if self.next_comment < len(self.comments):
            c = self.comments[self.next_comment]
            if c.span.start < before and c.span.line == self.last_end_line and self.lines:
                self.lines[-1] += "  " + c.text
                self.next_comment += 1
                self.last_end, self.last_end_line = c.span.end, c.span.line

    def after_open_line_is_blank(self) -> bool:
        return self.lines[-1] == ""

    def emit(self, text: str, start: int, end: int, end_line: int, indent: int, opens: bool = False,
             closes: bool = False) -> None:
        self._flush_comments(start, indent + (1 if closes else 0))
        if not closes and not self.after_open and self._blank_between(start):
            self.lines.append("")
        self.lines.append("  " * indent + text)
        self.last_end, self.last_end_line = end, end_line
        self.after_open = opens

    # ------------------------------------------------------------------ nodes
    def file(self, f: ast.File) -> str:
        for i, item in enumerate(f.items):
            if isinstance(item, ast.Import):
                self.emit(f"import {quote(item.path)}", item.span.start, item.span.end, item.span.end_line, 0)
            else:
                if i > 0 and self.lines:
                    # a model is separated by one blank line, its leading comments stay attached to it
                    self._flush_trailing(item.span.start)
                    if self.lines[-1] != "":
                        self.lines.append("")
                    self.after_open = True
                self.model(item)
        self._flush_comments(len(self.source) + 1, 0)
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines) + "\n" if self.lines else ""

    def model(self, m: ast.Model) -> None:
        head = f"model {m.name}" + (f" extends {m.extends[0]}" if m.extends else "") + " {"
        self.emit(head, m.span.start, m.open.end, m.open.end_line, 0, opens=True)
        for item in m.items:
            self.model_item(item, 1)
        self.emit("}", m.close.start, m.close.end, m.close.end_line, 0, closes=True)

    def model_item(self, item: ast.ModelItem, indent: int) -> None:
        if isinstance(item, ast.Component):
            self.component(item, indent)
        elif isinstance(item, ast.Stage):
            self.stage(item, indent)
        elif isinstance(item, ast.Attr):
            self.attr(item, indent)
        else:
            self.override(item, indent)

    def component(self, c: ast.Component, indent: int) -> None:
        head = f"{c.role} {c.name}"
        if c.kind is not None:
            head += f" = {c.kind}"
        if c.sources or c.target is not None:  # `(img + txt)`: a contrastive fusion has no target
            head += "(" + " + ".join(s for s, _ in c.sources) + (f" -> {c.target[0]})" if c.target else ")")
        if c.block is None or (not c.block.items and not self._has_comments(c.block.span.start, c.block.span.end)):
            end = c.span.end
            self.emit(head, c.span.start, end, c.span.end_line, indent)
            return
        self.emit(head + " {", c.span.start, c.block.span.start + 1, c.block.span.line, indent, opens=True)
        self.block_items(c.block, indent + 1)
        self.emit("}", c.block.close.start, c.block.close.end, c.block.close.end_line, indent, closes=True)

    def override(self, o: ast.Override, indent: int) -> None:
        self.emit(o.name + " {", o.span.start, o.block.span.start + 1, o.block.span.line, indent, opens=True)
        self.block_items(o.block, indent + 1)
        self.emit("}", o.block.close.start, o.block.close.end, o.block.close.end_line, indent, closes=True)

    def block_items(self, block: ast.Block, indent: int) -> None:
        for item in block.items:
            if isinstance(item, ast.Attr):
                self.attr(item, indent)
            else:
                self.override(item, indent)

    def attr(self, a: ast.Attr, indent: int) -> None:
        self.emit(f"{a.name} = {value_text(a.value)}", a.span.start, a.span.end, a.span.end_line, indent)

    def stage(self, s: ast.Stage, indent: int) -> None:
        head = f"stage {s.name}" + (f" extends {s.extends[0]}" if s.extends else "") + " {"
        self.emit(head, s.span.start, s.open.end, s.open.end_line, indent, opens=True)
        for item in s.items:
            self.emit(stage_item_text(item), item.span.start, item.span.end, item.span.end_line, indent + 1)
        self.emit("}", s.close.start, s.close.end, s.close.end_line, indent, closes=True)

    def _has_comments(self, start: int, end: int) -> bool:
        return any(start <= c.span.start < end for c in self.comments)


def stage_item_text(item: ast.StageItem) -> str:
    if isinstance(item, ast.TargetsStmt):
        return item.keyword + " " + ", ".join(
            t.path.dotted + (args_text(t.args) if t.args is not None else "") for t in item.targets)
    if isinstance(item, ast.ValueStmt):
        return f"{item.keyword} {value_text(item.value)}"
    if isinstance(item, ast.UpcycleStmt):
        return f"upcycle {item.source.dotted} -> {item.dest.dotted}"
    return f"{item.name} = {value_text(item.value)}"


def format_file(f: ast.File) -> str:
    """The canonical text of a parsed file."""
    return _Printer(f.source, list(f.comments)).file(f)


def format_text(text: str, path: str = "<input>") -> str:
    from vlmspec.grammar.parser import parse

    return format_file(parse(text, path))

"""Parse .vlm text into the AST, turning every Lark failure into a located `SpecSyntaxError`."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path as FsPath

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from vlmspec.compiler import ast
from vlmspec.diagnostics import Diagnostic, Span, SpecSyntaxError

_TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "a number",
    "FLOAT": "a number",
    "STRING": "a string",
    "$END": "the end of the file",
    "TRUE": "`true`",
    "FALSE": "`false`",
}


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("vlmspec.grammar").joinpath("vlm.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, cache=True)


def _span(file: str, meta_or_token) -> Span:
    m = meta_or_token
    return Span(file, m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)


def _join(file: str, a: Span, b: Span) -> Span:
    return Span(file, a.line, a.col, b.end_line, b.end_col, a.start, b.end)


class _ToAst(Transformer):
    """Lark tree -> AST. Lark calls one method per rule; each returns an AST node with its span."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, x) -> Span:
        return _span(self.file, x)

    # ---------------------------------------------------------- top level
    @v_args(meta=True)
    def start(self, meta, items):
        return items

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        (tok,) = children
        return ast.Import(_unquote(tok), self._s(meta))

    def extends_clause(self, children):
        (tok,) = children
        return (str(tok), self._s(tok))

    @v_args(meta=True)
    def model(self, meta, children):
        name, ext, lbrace, *items, rbrace = children
        return ast.Model(str(name), ext, items, self._s(meta), self._s(name), self._s(lbrace), self._s(rbrace))

    # ---------------------------------------------------------- components
    def role(self, children):
        return children[0]

    def kind_clause(self, children):
        return children[0]

    @v_args(meta=True)
    def flow(self, meta, children):
        sources, _arrow, target = children
        if target is None:  # `(img + txt)`: whether a target may be missing is the structure pass's call
            return sources, None
        return sources, (str(target), self._s(target))

    def sources(self, children):
        return [(str(t), self._s(t)) for t in children]

    @v_args(meta=True)
    def component(self, meta, children):
        role, name, kind, flow, block = children
        sources, target = flow if flow is not None else ([], None)
        if block is not None:
            header_end = block.span
            header_end = Span(self.file, header_end.line, header_end.col, header_end.line, header_end.col + 1,
                              header_end.start, header_end.start + 1)
        else:
            header_end = self._s(meta)
        return ast.Component(str(role), str(name), str(kind) if kind is not None else None, sources, target,
                             block, self._s(meta), self._s(name), self._s(kind) if kind is not None else None,
                             header_end)

    @v_args(meta=True)
    def block(self, meta, children):
        lbrace, *items, rbrace = children
        return ast.Block(items, _join(self.file, self._s(lbrace), self._s(rbrace)), self._s(rbrace))

    @v_args(meta=True)
    def override(self, meta, children):
        name, block = children
        return ast.Override(str(name), block, self._s(meta), self._s(name))

    @v_args(meta=True)
    def attr(self, meta, children):
        name, value = children
        return ast.Attr(str(name), value, self._s(meta), self._s(name))

    # ---------------------------------------------------------- stages
    @v_args(meta=True)
    def stage(self, meta, children):
        name, ext, lbrace, *items, rbrace = children
        return ast.Stage(str(name), ext, items, self._s(meta), self._s(name), self._s(lbrace), self._s(rbrace))

    def target_kw(self, children):
        return children[0]

    def value_kw(self, children):
        return children[0]

    @v_args(meta=True)
    def targets_stmt(self, meta, children):
        kw, *targets = children
        return ast.TargetsStmt(str(kw), targets, self._s(meta))

    @v_args(meta=True)
    def target(self, meta, children):
        path, args = children
        return ast.Target(path, args, self._s(meta))

    @v_args(meta=True)
    def path(self, meta, children):
        return ast.Path([str(t) for t in children], self._s(meta))

    @v_args(meta=True)
    def value_stmt(self, meta, children):
        kw, value = children
        return ast.ValueStmt(str(kw), value, self._s(meta))

    @v_args(meta=True)
    def upcycle_stmt(self, meta, children):
        src, _arrow, dst = children
        return ast.UpcycleStmt(src, dst, self._s(meta))

    # ---------------------------------------------------------- values
    @v_args(meta=True)
    def int(self, meta, children):
        (tok,) = children
        digits = str(tok).replace("_", "")
        if len(digits) > MAX_DIGITS:  # before int(): Python refuses to read more than ~4300 digits
            raise SpecSyntaxError([Diagnostic(
                "E0008", f"an integer of {len(digits)} digits is too long; at most {MAX_DIGITS} digits are read",
                self._s(meta), help="no spec value needs more than a few digits; is this a paste error?")])
        return ast.Int(int(digits), str(tok), self._s(meta))

    @v_args(meta=True)
    def float(self, meta, children):
        (tok,) = children
        return ast.Float(float(str(tok).replace("_", "")), str(tok), self._s(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        (tok,) = children
        return ast.Str(_unquote(tok), str(tok), self._s(meta))

    @v_args(meta=True)
    def true(self, meta, children):
        return ast.Bool(True, self._s(meta))

    @v_args(meta=True)
    def false(self, meta, children):
        return ast.Bool(False, self._s(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListVal([c for c in children if c is not None], self._s(meta))

    @v_args(meta=True)
    def ref(self, meta, children):
        return ast.Ref([str(t) for t in children], self._s(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        name, args, *attrs = children
        return ast.Call(str(name), args, [str(a) for a in attrs], self._s(meta))

    def call_args(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return ast.Arg(str(name), value, self._s(meta))

    @v_args(meta=True)
    def posarg(self, meta, children):
        (value,) = children
        return ast.Arg(None, value, self._s(meta))

    def _bin(op):  # noqa: N805 - a factory for the four operators, used at class-creation time
        @v_args(meta=True)
        def method(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, self._s(meta))

        return method

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")

    @v_args(meta=True)
    def neg(self, meta, children):
        (operand,) = children
        if isinstance(operand, ast.Int):
            return ast.Int(-operand.value, "-" + operand.text, self._s(meta))
        if isinstance(operand, ast.Float):
            return ast.Float(-operand.value, "-" + operand.text, self._s(meta))
        return ast.Neg(operand, self._s(meta))


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _unquote(tok: Token) -> str:
    """String literal -> value. Escapes: \\n, \\t, \\", \\\\ (anything else is kept as written)."""
    raw = str(tok)[1:-1]
    if "\\" not in raw:
        return raw
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


_VALUE_START = {"INT", "FLOAT", "STRING", "NAME", "TRUE", "FALSE", "LSQB", "LPAR", "MINUS"}


def _describe_expected(expected: set[str]) -> str:
    parser = _parser()
    names = []
    if {"INT", "FLOAT", "STRING"} <= expected:
        names.append("a value")
        expected = expected - _VALUE_START
    for term in sorted(expected):
        if term in _TERMINAL_NAMES:
            names.append(_TERMINAL_NAMES[term])
            continue
        try:
            pattern = parser.get_terminal(term).pattern
        except KeyError:
            names.append(term.lower())
            continue
        if pattern.type == "str":
            names.append(f"`{pattern.value}`")
        else:
            names.append(term.lower())
    names = sorted(set(names))
    if len(names) > 8:
        names = [*names[:8], "..."]
    return ", ".join(names)


def _unclosed_brace(text: str, upto: int) -> int | None:
    """Position of the last `{` not closed before `upto`, skipping strings and comments."""
    stack: list[int] = []
    i, n = 0, min(upto, len(text))
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == '"':
            i += 1
            while i < n and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
        elif c == "{":
            stack.append(i)
        elif c == "}" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _syntax_diagnostic(err: UnexpectedInput, text: str, file: str) -> Diagnostic:
    help_text = None
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        span = Span(file, err.line, err.column, err.line, err.column + 1, err.pos_in_stream, err.pos_in_stream + 1)
        if ch == '"':
            msg = "unterminated string"
            help_text = "close the string with `\"` on the same line"
        else:
            msg = f"unexpected character `{ch}`"
            if ch == ":":
                help_text = "attributes are written `name = value`"
            elif ch == "'":
                help_text = "strings use double quotes: \"...\""
            elif ch == ";":
                help_text = "statements need no `;`: separate them with spaces or new lines"
        expected = _describe_expected(set(err.allowed or ()))
        if expected:
            msg += f"; expected {expected}"
        return Diagnostic("E0001", msg, span, help=help_text)
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        pos = len(text)
        line, col = _line_col(text, max(0, pos - 1) if text else 0)
        span = Span(file, line, col, line, col + 1, pos, pos)
        open_at = _unclosed_brace(text, len(text))
        if open_at is not None:
            ol, oc = _line_col(text, open_at)
            help_text = f"the `{{` at line {ol}, column {oc} is never closed; add a `}}`"
            return Diagnostic("E0002", "unexpected end of file: a block is not closed", span, help=help_text)
        expected = _describe_expected(set(err.expected))
        return Diagnostic("E0002", f"unexpected end of file; expected {expected}", span, help=help_text)
    if not isinstance(err, UnexpectedToken):  # lark raises only the three kinds above; stay typed anyway
        return Diagnostic("E0003", f"cannot parse: {err}", None)
    tok = err.token
    span = _span(file, tok)
    expected_set = set(err.expected)
    expected = _describe_expected(expected_set)
    value = str(tok)
    msg = f"unexpected `{value}`; expected {expected}"
    before = _previous_word(text, tok.start_pos)
    if value == "=" and before in _STATEMENTS:
        help_text = f"`{before}` is a stage statement: write `{before} VALUE` without `=`"
    elif before in _STATEMENTS and "LBRACE" in expected_set:
        # `train proj` at model level: the statement word was read as a name
        help_text = f"`{before} ...` statements belong inside a `stage NAME {{ ... }}` block"
    elif value == "{" and re.fullmatch(r"\s*\w+\s*=\s*\w+\s*", text[text.rfind("\n", 0, tok.start_pos) + 1:tok.start_pos]):
        name = text[text.rfind("\n", 0, tok.start_pos) + 1:tok.start_pos].split("=")[0].strip()
        help_text = f"a component is declared with its role first, e.g. `vision {name} = ... {{`"
    elif tok.type == "RBRACE" and "NAME" in expected_set:
        help_text = "an attribute needs a value: `name = value`"
    return Diagnostic("E0003", msg, span, help=help_text)


_STATEMENTS = {"train", "freeze", "lora", "optim", "data", "batch", "epochs", "steps", "precision", "objective",
               "upcycle"}


def _previous_word(text: str, pos: int) -> str:
    """The identifier just before `pos` (skipping spaces), for hints about the token that follows it."""
    i = pos
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] == "_"):
        j -= 1
    return text[j:i]


#: Longer integer literals are refused (E0008); arithmetic stays below 10**MAX_DIGITS too (E0212).
MAX_DIGITS = 300

#: Deeper expressions are refused (E0006): every later pass walks expressions recursively, and no real
#: spec nests more than a handful of levels.
MAX_DEPTH = 100


def _too_deep(tree: Tree, file: str) -> Diagnostic | None:
    """A located E0006 at the first node nested deeper than MAX_DEPTH, found without recursion."""
    stack: list[tuple[Tree, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            m = node.meta
            span = Span(file, m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos) \
                if not m.empty else None
            return Diagnostic("E0006", f"an expression is nested more than {MAX_DEPTH} levels deep", span,
                              help="write the value out, or split it into named parameters")
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))
    return None


def parse(text: str, file: str = "<input>") -> ast.File:
    """Parse `text`; raise `SpecSyntaxError` with a located diagnostic on malformed input."""
    comments: list[ast.Comment] = []
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        raise SpecSyntaxError([_syntax_diagnostic(err, text, file)], {file: text}) from None
    deep = _too_deep(tree, file)
    if deep is not None:
        raise SpecSyntaxError([deep], {file: text})
    try:
        items = _ToAst(file).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, SpecSyntaxError):  # a located refusal from the transformer (E0008)
            raise SpecSyntaxError(err.orig_exc.diagnostics, {file: text}) from None
        raise SpecSyntaxError([Diagnostic("E0003", f"malformed input: {err.orig_exc}")], {file: text}) from None
    # Comments are ignored by the parser; collect them by a separate lexer pass so `fmt` keeps them.
    comments = _comments(text, file)
    return ast.File(file, text, items, comments)


def _comments(text: str, file: str) -> list[ast.Comment]:
    out = []
    for tok in _parser().lex(text, dont_ignore=True):
        if tok.type == "COMMENT":
            out.append(ast.Comment(str(tok).rstrip(), _span(file, tok)))
    return out


def parse_file(path: str | FsPath) -> ast.File:
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecSyntaxError([Diagnostic("E0004", f"no such file: {p}")]) from None
    except UnicodeDecodeError as err:
        diag, shown = not_utf8(str(path), err)
        raise SpecSyntaxError([diag], {str(path): shown}) from None
    except OSError as err:
        raise SpecSyntaxError([Diagnostic("E0004", f"cannot read {p}: {err.strerror or err}")]) from None
    return parse(text, str(path))


def not_utf8(file: str, err: UnicodeDecodeError, code: str = "E0004") -> tuple[Diagnostic, str]:
    """A diagnostic at the first byte that is not UTF-8, and the text to show it in (bad bytes replaced)."""
    data = bytes(err.object)
    shown = data.decode("utf-8", errors="replace")
    line = data.count(b"\n", 0, err.start) + 1
    line_start = data.rfind(b"\n", 0, err.start) + 1
    col = len(data[line_start:err.start].decode("utf-8", errors="replace")) + 1
    pos = len(data[:err.start].decode("utf-8", errors="replace"))
    span = Span(file, line, col, line, col + 1, pos, pos + 1)
    return Diagnostic(code, f"`{file}` is not UTF-8 text: byte 0x{data[err.start]:02x} cannot start a character",
                      span, help="a spec is UTF-8 text; save it as UTF-8 (is this a binary file?)"), shown

"""One diagnostic format for every error vlmspec reports, rendered the way rustc and ruff do.

Every stage of the pipeline (parser, resolver, passes, runtime checks of user input) reports
problems as `Diagnostic` values instead of raising ad-hoc exceptions, so that the CLI can show all
of them at once, with the source line and a caret, and tools can read them as JSON.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    start: int = 0
    end: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A problem found in a spec, with where it is and what would fix it."""

    code: str
    message: str
    span: Span | None = None
    severity: Severity = "error"
    help: str | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        out: dict = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.span is not None:
            out.update(file=self.span.file, line=self.span.line, col=self.span.col,
                       end_line=self.span.end_line, end_col=self.span.end_col)
        if self.help:
            out["help"] = self.help
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class VlmSpecError(Exception):
    """Base of every error vlmspec raises on purpose: it carries diagnostics, never a bare string."""

    def __init__(self, diagnostics: Sequence[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(render_all(self.diagnostics, self.sources, color=False))


class SpecSyntaxError(VlmSpecError):
    """The text is not a well-formed .vlm file."""


class SpecValidationError(VlmSpecError):
    """The text parses, but the architecture it describes is inconsistent."""


class UserInputError(VlmSpecError):
    """Bad input at run time (an image, a prompt, a checkpoint): reported without a traceback."""


def user_error(code: str, message: str, help: str | None = None) -> UserInputError:
    """A one-line run-time error with no source location (images, checkpoints, prompts)."""
    return UserInputError([Diagnostic(code, message, help=help)])


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """A `did you mean` hint built from the real options, so it never names something that is not there."""
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return None


def one_of(options: Iterable[str]) -> str:
    opts = sorted(set(options))
    return "expected one of: " + ", ".join(f"`{o}`" for o in opts)


#: A longer source line is shown as a window of context around the span, marked `...`, so that one
#: diagnostic on a megabyte line is not a megabyte of output.
LONG_LINE = 1000
_CONTEXT = 60


def render(diag: Diagnostic, sources: dict[str, str], color: bool = False,
           _lines: dict[str, list[str]] | None = None) -> str:
    """Render one diagnostic: header, the source line, a caret under the span, then help and notes."""
    red, yellow, blue, bold, reset = ("\x1b[31m", "\x1b[33m", "\x1b[34m", "\x1b[1m", "\x1b[0m") if color else ("",) * 5
    sev_color = red if diag.severity == "error" else yellow
    where = f"{diag.span}: " if diag.span else ""
    lines = [f"{bold}{where}{sev_color}{diag.severity}[{diag.code}]{reset}{bold}: {diag.message}{reset}"]
    if diag.span is not None and diag.span.file in sources:
        # lines end at "\n" only, as the parser counts them (splitlines() would also break at \r, \f, ...)
        if _lines is None or diag.span.file not in _lines:
            text_lines = sources[diag.span.file].split("\n")
            if _lines is not None:
                _lines[diag.span.file] = text_lines
        else:
            text_lines = _lines[diag.span.file]
        if 1 <= diag.span.line <= len(text_lines):
            src = text_lines[diag.span.line - 1]
            gutter = str(diag.span.line)
            pad = " " * len(gutter)
            at = diag.span.col - 1
            if diag.span.end_line == diag.span.line:
                width = max(1, diag.span.end_col - diag.span.col)
            else:
                width = max(1, len(src) - diag.span.col + 1)
            if len(src) > LONG_LINE:
                lo = max(0, at - _CONTEXT)
                hi = min(len(src), at + min(width, _CONTEXT) + _CONTEXT)
                src = ("..." if lo else "") + src[lo:hi] + ("..." if hi < len(src) else "")
                width = max(1, min(width, hi - at))
                at = at - lo + (3 if lo else 0)
            src = src.removesuffix("\r").expandtabs(1)  # a tab is one column, as the parser counts it
            lines.append(f"{blue}{pad} |{reset}")
            lines.append(f"{blue}{gutter} |{reset} {src}")
            lines.append(f"{blue}{pad} |{reset} {' ' * at}{sev_color}{'^' * width}{reset}")
    if diag.help:
        lines.append(f"  {bold}help{reset}: {diag.help}")
    for note in diag.notes:
        lines.append(f"  {bold}note{reset}: {note}")
    return "\n".join(lines)


def render_all(diags: Sequence[Diagnostic], sources: dict[str, str], color: bool = False) -> str:
    split: dict[str, list[str]] = {}  # each source split into lines once, however many diagnostics it has
    return "\n\n".join(render(d, sources, color, split) for d in diags)


def to_json(diags: Sequence[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diags], indent=2)


@dataclass(slots=True)
class DiagnosticSink:
    """Collects diagnostics across a pass so a user sees every problem at once, not the first one."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span | None = None, help: str | None = None,
              notes: Sequence[str] = ()) -> None:
        self.items.append(Diagnostic(code, message, span, "error", help, tuple(notes)))

    def warning(self, code: str, message: str, span: Span | None = None, help: str | None = None,
                notes: Sequence[str] = ()) -> None:
        self.items.append(Diagnostic(code, message, span, "warning", help, tuple(notes)))

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

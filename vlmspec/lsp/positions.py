"""Positions: the compiler's 1-based line/column by "\\n" in code points -> LSP's 0-based line/character.

The two disagree in two ways, and both matter for exact ranges:

- lines: the parser ends a line at "\\n" only; LSP also ends one at a lone "\\r" (and "\\r\\n" is one break);
- columns: the parser counts code points; LSP counts UTF-16 code units unless the client negotiated
  UTF-8 or UTF-32, so an emoji before a span moves its column by one (UTF-16) or three (UTF-8).

So every conversion goes through a character offset into the text: parser (line, col) -> offset, then
offset -> LSP position under LSP's line rules and the negotiated unit. `LineIndex` builds the tables
once per text; a lookup is a binary search, even on the megabyte lines the fuzz corpus contains.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from lsprotocol import types

from vlmspec.diagnostics import Span

#: What LSP counts as a line break (LSP 3.17, "Text Documents"): "\r\n", "\n" or "\r".
_LSP_BREAK = re.compile(r"\r\n|\n|\r")
_WIDE = {
    "utf-16": re.compile(r"[\U00010000-\U0010ffff]"),
    "utf-8": re.compile(r"[^\x00-\x7f]"),
}


def _units(ch: str, encoding: str) -> int:
    if encoding == "utf-16":
        return 2 if ord(ch) > 0xFFFF else 1
    return len(ch.encode("utf-8", "surrogatepass"))


@dataclass(slots=True)
class LineIndex:
    """Offsets of line starts (parser's and LSP's) and of the characters that take more than one unit."""

    text: str
    encoding: str = "utf-16"
    parser_starts: list[int] = field(default_factory=list)
    lsp_starts: list[int] = field(default_factory=list)
    wide_at: list[int] = field(default_factory=list)  # offsets of characters wider than one unit
    wide_extra: list[int] = field(default_factory=list)  # extra units up to and including wide_at[i]

    def __post_init__(self) -> None:
        text = self.text
        self.encoding = str(getattr(self.encoding, "value", self.encoding)).lower()
        self.parser_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lsp_starts = [0] + [m.end() for m in _LSP_BREAK.finditer(text)]
        wide = _WIDE.get(self.encoding)
        if wide is not None:
            extra = 0
            for m in wide.finditer(text):
                extra += _units(m.group(), self.encoding) - 1
                self.wide_at.append(m.start())
                self.wide_extra.append(extra)

    # ---------------------------------------------------------------- parser side
    def offset_of(self, line: int, col: int) -> int:
        """The offset of the parser's 1-based (line, col), clamped into the text."""
        if line < 1:
            return 0
        if line > len(self.parser_starts):
            return len(self.text)
        start = self.parser_starts[line - 1]
        end = self.parser_starts[line] - 1 if line < len(self.parser_starts) else len(self.text)
        return min(max(start + col - 1, start), end)

    # ---------------------------------------------------------------- LSP side
    def _extra_before(self, offset: int) -> int:
        i = bisect.bisect_left(self.wide_at, offset)
        return self.wide_extra[i - 1] if i else 0

    def position(self, offset: int) -> types.Position:
        """The LSP position of a character offset (clamped into the text)."""
        offset = min(max(offset, 0), len(self.text))
        line = bisect.bisect_right(self.lsp_starts, offset) - 1
        start = self.lsp_starts[line]
        if offset > start and self.text[offset - 1] == "\r" and offset < len(self.text) and self.text[offset] == "\n":
            offset -= 1  # between the two characters of one "\r\n": the break starts at the "\r"
        units = offset - start + self._extra_before(offset) - self._extra_before(start)
        return types.Position(line=line, character=units)

    def offset(self, pos: types.Position) -> int:
        """The character offset of an LSP position; a character past the line's end means the end."""
        if pos.line < 0:
            return 0
        if pos.line >= len(self.lsp_starts):
            return len(self.text)
        start = self.lsp_starts[pos.line]
        end = self.lsp_starts[pos.line + 1] if pos.line + 1 < len(self.lsp_starts) else len(self.text)
        while end > start and self.text[end - 1] in "\r\n":
            end -= 1
        want = max(pos.character, 0)
        i = bisect.bisect_left(self.wide_at, start)
        at, units = start, 0
        while i < len(self.wide_at) and self.wide_at[i] < end:
            w = self.wide_at[i]
            if units + (w - at) >= want:
                break
            units += w - at
            step = _units(self.text[w], self.encoding)
            if units + step > want:  # inside a wide character: stay before it
                return w
            units += step
            at = w + 1
            i += 1
        return min(at + (want - units), end)

    def range(self, start: int, end: int) -> types.Range:
        return types.Range(start=self.position(start), end=self.position(max(start, end)))

    def point(self, line: int, col: int) -> types.Position:
        """The LSP position of the parser's 1-based (line, col). A column past the end of its line (an
        end-of-file error points just after the last character) stays past it, as `vlm check` reports
        it; editors clamp such a column to the line's end."""
        if not 1 <= line <= len(self.parser_starts):
            return self.position(self.offset_of(line, col))
        start = self.parser_starts[line - 1]
        end = self.parser_starts[line] - 1 if line < len(self.parser_starts) else len(self.text)
        at = start + max(col, 1) - 1
        if at <= end:
            return self.position(at)
        p = self.position(end)
        return types.Position(line=p.line, character=p.character + at - end)

    def span_range(self, span: Span) -> types.Range:
        """The LSP range of a compiler span (from its line/col, which every span has; offsets may be unset)."""
        return types.Range(start=self.point(span.line, span.col), end=self.point(span.end_line, span.end_col))

    def end(self) -> types.Position:
        return self.position(len(self.text))

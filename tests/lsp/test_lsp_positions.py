"""Compiler spans (1-based, lines by "\\n", code points) -> LSP positions (0-based, lines by "\\n", "\\r\\n"
or "\\r", in the negotiated unit): the conversions every range the server sends goes through."""

from __future__ import annotations

import pytest

from vlmspec.diagnostics import Span
from vlmspec.lsp.positions import LineIndex

TEXT = "a = 1\r\nb🙂c = \"é\"\rd = 2\n"


@pytest.mark.parametrize(("encoding", "after_emoji"), [("utf-16", 3), ("utf-8", 5), ("utf-32", 2)])
def test_units_per_encoding(encoding: str, after_emoji: int) -> None:
    index = LineIndex(TEXT, encoding)
    at = TEXT.index("c =")
    pos = index.position(at)
    assert (pos.line, pos.character) == (1, after_emoji)
    assert index.offset(pos) == at
    inside = type(pos)(line=1, character=2) if encoding != "utf-32" else None
    if inside is not None:  # a position inside the emoji's units lands before it
        assert index.offset(inside) == TEXT.index("🙂")


def test_lone_cr_and_crlf_break_lsp_lines_not_parser_lines() -> None:
    index = LineIndex(TEXT)
    d = TEXT.index("d = 2")
    # the parser sees "b🙂c ... \rd = 2" as line 2 (only "\n" ends a line); LSP as lines 1 and 2
    span = Span("x.vlm", 2, d - TEXT.index("b") + 1, 2, d - TEXT.index("b") + 2)
    rng = index.span_range(span)
    assert (rng.start.line, rng.start.character, rng.end.character) == (2, 0, 1)
    assert index.position(TEXT.index("\n")).line == 0  # the "\n" of "\r\n" belongs to the break of line 0
    assert (index.end().line, index.end().character) == (3, 0)


def test_a_column_past_the_line_stays_past_it() -> None:
    """`vlm check` points an end-of-file error one column past the last character; so does the server."""
    index = LineIndex("model m {\n  x = 1\n")
    rng = index.span_range(Span("x.vlm", 2, 8, 2, 9))
    assert (rng.start.line, rng.start.character, rng.end.line, rng.end.character) == (1, 7, 1, 8)
    far = index.span_range(Span("x.vlm", 9, 1, 9, 2))  # a line that is not there: the end of the text
    assert (far.start.line, far.start.character) == (2, 0)

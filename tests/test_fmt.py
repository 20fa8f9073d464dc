"""`vlm fmt` is canonical, idempotent, keeps comments, and never changes meaning."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmspec.compiler.compile import check_file
from vlmspec.compiler.printer import format_text
from vlmspec.grammar.parser import _parser

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.vlm"))


def irs(text: str) -> dict:
    result = check_file("x.vlm", text=text)
    assert result.ok, [d.message for d in result.diagnostics]
    return {a.ir.name: a.ir.model_dump() for a in result.analyses}


def respace(text: str, rng: random.Random) -> str:
    """The same tokens, joined with random whitespace and extra comments: the same program."""
    out = []
    for tok in _parser().lex(text, dont_ignore=True):
        if tok.type == "COMMENT":
            out.append(str(tok) + "\n")
            continue
        out.append(str(tok))
        out.append(rng.choice([" ", "  ", "\n", " \n\n   ", "\t"]))
        if rng.random() < 0.05:
            out.append(f"  # note {rng.randint(0, 99)}\n")
    return "".join(out)


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_library_is_formatted_and_stable(path: Path) -> None:
    text = path.read_text()
    once = format_text(text)
    assert format_text(once) == once
    assert irs(once) == irs(text)
    assert once == text, f"{path.name} is not in canonical form: run `vlm fmt {path}`"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SPECS), st.integers(0, 2**32 - 1))
def test_respaced_specs_format_back(path: Path, seed: int) -> None:
    text = path.read_text()
    messy = respace(text, random.Random(seed))
    assert irs(messy) == irs(text)
    pretty = format_text(messy)
    assert format_text(pretty) == pretty
    assert irs(pretty) == irs(text)


def test_comments_are_kept_in_place() -> None:
    src = (
        "# header\n\nmodel m {  # opens\n  # about clip\n"
        "  vision clip = vit { width = 32  depth = 2  # trailing\n  }\n\n"
        "  # a stage\n  stage s { freeze clip  # why\n  }\n  # last words\n}\n# end\n"
    )
    out = format_text(src)
    assert out == (
        "# header\n\nmodel m {  # opens\n  # about clip\n"
        "  vision clip = vit {\n    width = 32\n    depth = 2  # trailing\n  }\n\n"
        "  # a stage\n  stage s {\n    freeze clip  # why\n  }\n  # last words\n}\n# end\n"
    )
    assert format_text(out) == out


def test_expressions_keep_their_structure() -> None:
    src = "model m {\n  language llm = llama {\n    ffn = (width - 2) * 4 / 2\n    x = -(a + b)\n    y = a - (b - c)\n  }\n}\n"
    assert format_text(src) == src

"""editors/vlm.tmLanguage.json stays true to the language: every role, kind and stage keyword is highlighted,
and its patterns read numbers, strings and comments as the grammar (vlmspec/grammar/vlm.lark) does."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmspec.compiler.schema import REGISTRY, ROLES
from vlmspec.grammar.parser import _STATEMENTS

GRAMMAR = json.loads((Path(__file__).resolve().parents[2] / "editors" / "vlm.tmLanguage.json").read_text())
REPO = GRAMMAR["repository"]


def _pattern(name: str) -> re.Pattern:
    return re.compile(REPO[name]["match"])


def test_every_kind_is_listed_under_its_role() -> None:
    by_scope = {p["name"].rsplit(".", 2)[-2]: p["match"] for p in REPO["kind"]["patterns"] if "kind." in p["name"]}
    for role in ROLES:
        listed = set(re.search(r"\(([^)]*)\)", by_scope[role]).group(1).split("|"))
        assert listed == set(REGISTRY.kinds(role)), role


def test_roles_and_stage_statements() -> None:
    header = REPO["component-header"]["patterns"][0]["match"]
    assert set(re.search(r"\(([a-z|]+)\)", header).group(1).split("|")) == set(ROLES)
    words = re.search(r"\(([a-z|]+)\)", REPO["stage-statement"]["match"]).group(1).split("|")
    assert set(words) == _STATEMENTS
    assert _pattern("stage-statement").search("    train proj, llm")
    assert not _pattern("stage-statement").search("    batch = 8")


def test_numbers_strings_comments() -> None:
    number = _pattern("number")
    for text in ("32", "32_000", "1.5", ".5", "1.", "2e-5", "1.5E3"):
        assert number.fullmatch(text), text
    assert not number.search("llm2") and not number.search("x_1")
    assert _pattern("comment").search('  width = 4  # a comment').group() == "# a comment"
    assert GRAMMAR["scopeName"] == "source.vlm" and GRAMMAR["fileTypes"] == ["vlm"]

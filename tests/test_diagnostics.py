"""Every diagnostic code renders as documented: file:line:col, the source line, a caret, help.

Snapshots live in tests/snapshots/CODE.txt. A normal run never writes one: a missing or different snapshot
fails with the rendered text. Write them deliberately with `UPDATE_SNAPSHOTS=1 pytest tests/test_diagnostics.py`
and review the diff like any other change.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from diag_cases import CASES, spec

from vlmspec.compiler.compile import check_file
from vlmspec.diagnostics import render_all

SNAPSHOTS = Path(__file__).parent / "snapshots"
ROOT = Path(__file__).resolve().parent.parent


def rendered(code: str, tmp_path: Path) -> tuple[str, list[str]]:
    path = tmp_path / "spec.vlm"
    path.write_text(CASES[code])
    result = check_file(str(path))
    text = render_all(result.diagnostics, result.sources).replace(str(tmp_path), "<tmp>")
    return text, [d.code for d in result.diagnostics]


@pytest.mark.parametrize("code", sorted(CASES))
def test_diagnostic_snapshot(code: str, tmp_path: Path) -> None:
    text, codes = rendered(code, tmp_path)
    assert code in codes, f"{code} not reported; got {codes}:\n{text}"
    snap = SNAPSHOTS / f"{code}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snap.write_text(text + "\n")
    write = f"UPDATE_SNAPSHOTS=1 pytest tests/test_diagnostics.py -k {code}"
    if not snap.exists():
        pytest.fail(f"no snapshot {snap}; it would hold:\n{text}\n\nwrite it with `{write}`", pytrace=False)
    assert text + "\n" == snap.read_text(), f"{code} renders differently from its snapshot (`{write}` rewrites it)"
    # the rustc/ruff shape: location, code, source line and caret
    first = text.splitlines()[0]
    if code not in {"E0106", "E0313"} or "<tmp>" in first:
        assert re.match(r"<tmp>/spec\.vlm:\d+:\d+: (error|warning)\[[EW]\d{4}\]: ", first), first
        assert "^" in text


def test_a_missing_snapshot_fails_and_is_not_written(tmp_path: Path, monkeypatch) -> None:
    """Outside `UPDATE_SNAPSHOTS=1` a missing snapshot is a failure that shows the text, never a new file."""
    empty = tmp_path / "snapshots"
    empty.mkdir()
    monkeypatch.setattr(sys.modules[__name__], "SNAPSHOTS", empty)
    monkeypatch.delenv("UPDATE_SNAPSHOTS", raising=False)
    (tmp_path / "case").mkdir()
    with pytest.raises(pytest.fail.Exception) as e:
        test_diagnostic_snapshot("E0104", tmp_path / "case")
    text, _ = rendered("E0104", tmp_path / "case")
    assert text in str(e.value) and "UPDATE_SNAPSHOTS=1 pytest tests/test_diagnostics.py -k E0104" in str(e.value)
    assert not any(empty.iterdir())


def all_codes_in_source() -> set[str]:
    codes = set()
    for py in (ROOT / "vlmspec").rglob("*.py"):
        codes.update(re.findall(r'"([EW]0[0-4]\d\d)"', py.read_text()))
    return codes


def test_every_front_end_code_has_a_case() -> None:
    # E0004/E0005/E0007/E0110 are reported without a spec (unreadable file, bad CLI option, a port in use,
    # unknown model name): tests/test_cli.py covers them.
    missing = all_codes_in_source() - set(CASES) - {"E0004", "E0005", "E0007", "E0110", "E0210"}
    assert not missing, f"codes without a snapshot case: {sorted(missing)}"


def test_every_code_is_documented() -> None:
    doc = (ROOT / "docs" / "language.md").read_text()
    missing = [c for c in sorted(all_codes_in_source()) if c not in doc]
    assert not missing, f"codes missing from docs/language.md: {missing}"


def test_all_errors_are_collected(tmp_path: Path) -> None:
    path = tmp_path / "spec.vlm"
    path.write_text(
        "model m {\n"
        "  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  colour = 1 }\n"
        "  connector proj = mpl(clip -> llm)\n"
        "  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = -1 }\n"
        "}\n")
    codes = [d.code for d in check_file(str(path)).diagnostics]
    assert codes.count("E0104") == 1 and "E0105" in codes and "E0202" in codes, codes


def test_capitalised_unknown_attribute_is_named(tmp_path: Path) -> None:
    """pydantic names union branches with capitalised tags; a user's capitalised typo is not one
    (found by the fuzz test: `Amax_positions` crashed the error report)."""
    path = tmp_path / "spec.vlm"
    path.write_text(spec(language="  language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  "
                                  "Amax_positions = 256 }\n"))
    (d,) = check_file(str(path)).diagnostics
    assert d.code == "E0104" and "Amax_positions" in d.message and "max_positions" in (d.help or "")

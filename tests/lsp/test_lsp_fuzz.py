"""The server's functions never raise on the fuzz corpus: scripts/fuzz.py's mutants of every library spec
(byte, token and structure mutations), given to them as an editor would hand them over.

A mutant that is not UTF-8 arrives either as text with U+FFFD for its bad bytes (the editor's view of
a file on disk) or with lone surrogates (a client passing raw bytes through); both must end in one
located E0004. Every other mutant must end in exactly the diagnostics `vlm check` reports, and hover,
completion, definition, symbols and formatting must answer at a few positions without raising.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

from lsprotocol import types

from vlmspec.lsp.completion import complete
from vlmspec.lsp.definition import definition, references
from vlmspec.lsp.diagnostics import INTERNAL, diagnose
from vlmspec.lsp.documents import Snapshot, path_to_uri
from vlmspec.lsp.formatting import format_document
from vlmspec.lsp.hover import hover
from vlmspec.lsp.symbols import document_symbols

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = 300


def _fuzz_script():
    """scripts/fuzz.py as a module, loaded once per session (tests/test_fuzz.py loads it the same way)."""
    if "vlm_fuzz_script" not in sys.modules:  # registered before it runs: its dataclasses look it up
        spec_ = importlib.util.spec_from_file_location("vlm_fuzz_script", ROOT / "scripts" / "fuzz.py")
        module = importlib.util.module_from_spec(spec_)
        sys.modules["vlm_fuzz_script"] = module
        spec_.loader.exec_module(module)
    return sys.modules["vlm_fuzz_script"]


def _within(rng: types.Range, lines: int) -> bool:
    return 0 <= rng.start.line < lines and 0 <= rng.end.line < lines and rng.start.character >= 0 \
        and (rng.start.line, rng.start.character) <= (rng.end.line, rng.end.character)


def test_server_functions_never_raise_on_fuzz_mutants(tmp_path: Path) -> None:
    fuzz = _fuzz_script()
    seeds = fuzz.load_seeds()
    path = tmp_path / "mutant.vlm"
    counts = {"clean": 0, "errors": 0, "not utf-8": 0}
    for i in range(MUTANTS):
        rng = random.Random(f"lsp:{i}")
        data, ops = fuzz.mutant(rng, seeds)
        try:
            text = data.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
            path.write_bytes(data)
            text = data.decode("utf-8", "replace") if i % 2 else data.decode("utf-8", "surrogateescape")
        snap = Snapshot(path_to_uri(path), text)
        by_file = diagnose(snap)
        own = by_file[snap.path]
        lines = snap.index().lsp_starts
        assert all(d.code != INTERNAL for ds in by_file.values() for d in ds), (i, ops, own)
        assert all(_within(d.range, len(lines)) for d in own), (i, ops, own)
        if not utf8:
            assert [d.code for d in own] == ["E0004"], (i, ops, own)
            counts["not utf-8"] += 1
        else:
            expected = [(d.code, d.severity) for d in snap.result.diagnostics]
            got = [(d.code, "error" if d.severity == types.DiagnosticSeverity.Error else "warning") for d in own]
            assert got == expected, (i, ops)
            counts["errors" if not snap.result.ok else "clean"] += 1
        # the other features, at the start, the middle and the end of the mutant
        for offset in {0, len(text) // 2, len(text)}:
            pos = snap.index().position(offset)
            hover(snap, pos)
            complete(snap, pos)
            definition(snap, pos)
            references(snap, pos, True)
        document_symbols(snap)
        format_document(snap)
    assert counts["clean"] and counts["errors"] and counts["not utf-8"], counts

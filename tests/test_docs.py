"""The documentation stays true to the code: generated tables are current, README commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_runtime_error_table_is_current() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "runtime_codes.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_command_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = set(re.findall(r"`vlm ([a-z-]+)", readme)) | set(re.findall(r"^\s*vlm ([a-z-]+)", readme, re.M))
    runner = CliRunner()
    for name in sorted(commands):
        r = runner.invoke(app, [*name.split(), "--help"])
        assert r.exit_code == 0, f"`vlm {name}` is in the README but does not exist"


def test_format_table_is_current() -> None:
    """docs/weights.md's formats x {import, export, tokenizer, chat template, processor} table is the one
    the format modules give (each export claimed there is tested bit for bit in tests/weights/test_export_*)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "format_table.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

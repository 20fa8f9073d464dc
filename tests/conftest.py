import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec to a temp file and return its path."""

    def write(text: str, name: str = "spec.vlm") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    return write

"""`make demo`: check the bundled spec library, then summarise and diff the tiny LLaVA."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLM = str(Path(sys.executable).parent / "vlm")
SPEC = "specs/llava-1.5-7b.vlm"


def run(*args: str) -> None:
    print(f"\n$ vlm {' '.join(args)}", flush=True)
    subprocess.run([VLM, *args], cwd=ROOT, check=True)


def main() -> None:
    run("check", *sorted(glob.glob(str(ROOT / "specs" / "*.vlm"))))
    run("summary", f"{SPEC}:llava_1_5_7b")
    run("diff", f"{SPEC}:llava_1_5_7b", f"{SPEC}:llava_1_5_7b_tiny")


if __name__ == "__main__":
    main()

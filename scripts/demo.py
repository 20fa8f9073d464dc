"""`make demo`: the whole loop on a laptop CPU, in a few minutes.

1. check the spec library;  2. generate the synthetic shapes dataset;  3. train the tiny LLaVA's two
stages (align, then instruct);  4. score held-out questions with `vlm eval`;  5. ask the trained model
about an image it never saw, with `vlm generate`.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLM = str(Path(sys.executable).parent / "vlm")
SPEC = "specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"
OUT = ROOT / "demo-out"


def run(*args: str) -> None:
    print(f"\n$ vlm {' '.join(args)}", flush=True)
    subprocess.run([VLM, *args], cwd=ROOT, check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    run("check", *sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "specs" / "*.vlm"))))
    run("summary", SPEC)
    run("data", "synth", "-o", "demo-out/shapes", "--n", "4000", "--test", "200", "--size", "64")
    run("train", SPEC, "--data", "demo-out/shapes", "-o", "demo-out/run", "--eval", "demo-out/shapes/test_vqa.jsonl",
        "--eval-every", "250")
    run("eval", "demo-out/run/final", "--task", "vqa", "--data", "demo-out/shapes/test_vqa.jsonl",
        "-o", "demo-out/eval.json")
    test = json.loads((OUT / "shapes" / "test.json").read_text())[0]
    image = f"demo-out/shapes/{test['image']}"
    question = test["conversations"][0]["value"].replace("<image>\n", "")
    print(f"\nheld-out image {image}; the truth is: {test['conversations'][1]['value']}")
    run("generate", "demo-out/run/final", "--image", image, "--prompt", question)


if __name__ == "__main__":
    main()

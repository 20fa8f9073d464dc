"""`vlm serve` and `vlm eval` on an imported checkpoint folder answer token for token as transformers'
processor + chat template + greedy `generate` on the same folder, with no extra flag. The folder is a
tiny Qwen2-VL, the hardest case: each image is read at its own size (a wide and a tall image take 12
and 6 tokens), so the server prefills them apart and decodes them together, and `vlm eval` batches
them one size at a time."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from test_import_folder import runner  # noqa: E402
from test_import_folder_qwen_idefics_mllama import QWEN_TEMPLATE, noise_image, qwen_reference, tokenizer_with  # noqa: E402
from test_server import Server, chat_body  # noqa: E402

from vlmspec.cli import app  # noqa: E402
from vlmspec.runtime.serve import ServeConfig, create_app  # noqa: E402
from vlmspec.runtime.session import load_session  # noqa: E402

QUESTIONS = ("What is in the picture?", "Describe it.")
NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[tuple[Path, str, str]]]:
    """(built folder, [(image, question, transformers' answer)]) for a tiny Qwen2-VL folder."""
    from test_parity_qwen2_vl import END, IMG, MERGE, PATCH, START, TEMPORAL, qwen2_vl
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tmp = tmp_path_factory.mktemp("qwen")
    hf_dir = tmp / "hf"
    qwen2_vl(hf_dir, seed=2)
    tok = tokenizer_with(127, {IMG: "<|image_pad|>", 101: "<|video_pad|>", START: "<|vision_start|>",
                               END: "<|vision_end|>", 104: "<|im_start|>", 105: "<|im_end|>"}, bos=None,
                         eos="<|im_end|>")
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(hf_dir))
    images = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=PATCH, merge_size=MERGE,
                                      temporal_patch_size=TEMPORAL, image_mean=[0.5, 0.4, 0.3],
                                      image_std=[0.2, 0.3, 0.4])
    (hf_dir / "preprocessor_config.json").unlink()
    images.save_pretrained(str(hf_dir))
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    (hf_dir / "generation_config.json").write_text(json.dumps({**gen, "bos_token_id": None, "eos_token_id": 105,
                                                               "pad_token_id": 3}))
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    cases = []
    for i, size in enumerate([(90, 40), (30, 52), (90, 40), (30, 52)]):  # two sizes, two questions each
        image = noise_image(tmp / f"{i}.png", size)
        q = QUESTIONS[i // 2]
        inputs = qwen_reference(images, tok, image, q, MERGE)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=[IMG])
        cases.append((image, q, tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
    assert len({a for _, _, a in cases}) >= 3  # the answers depend on the image and the question
    spec = tmp / "m.vlm"
    assert runner.invoke(app, ["import-hf", str(hf_dir), "-o", str(spec)]).exit_code == 0
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp / "built")])
    assert r.exit_code == 0, r.output
    return tmp / "built", cases


def test_vlm_serve_answers_as_transformers(folder) -> None:
    built, cases = folder
    session = load_session(built)
    with Server(create_app(session, ServeConfig(max_wait_ms=200))) as s:
        def ask(case: tuple[Path, str, str]) -> str:
            image, q, _ = case
            r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(q, image.read_bytes(), max_tokens=NEW),
                           timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"].strip()

        with ThreadPoolExecutor(4) as pool:  # together: two image sizes prefilled apart, decoded in one batch
            got = list(pool.map(ask, cases))
    assert got == [want for _, _, want in cases]


def test_vlm_eval_answers_as_transformers(folder, tmp_path: Path) -> None:
    built, cases = folder
    data = tmp_path / "vqa.jsonl"
    data.write_text("".join(json.dumps({"image": str(img), "question": q, "answers": [want]}) + "\n"
                            for img, q, want in cases))
    out = tmp_path / "results.json"
    r = runner.invoke(app, ["eval", str(built), "--task", "vqa", "--data", str(data), "-o", str(out),
                            "--max-new-tokens", str(NEW), "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["samples"]
    assert [row["prediction"] for row in rows] == [want for _, _, want in cases]

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
import hf_tiny  # noqa: E402
from test_import_folder import runner  # noqa: E402
from test_import_folder_qwen_idefics_mllama import noise_image, qwen_folder, qwen_reference  # noqa: E402
from test_server import Server, chat_body  # noqa: E402

from vlmspec.cli import app  # noqa: E402
from vlmspec.runtime.serve import ServeConfig, create_app  # noqa: E402
from vlmspec.runtime.session import load_session  # noqa: E402

QUESTIONS = ("What is in the picture?", "Describe it.")
NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[tuple[Path, str, str]]]:
    """(built folder, [(image, question, transformers' answer)]) for a tiny Qwen2-VL folder."""
    from test_parity_qwen2_vl import IMG, MERGE, qwen2_vl

    tmp = tmp_path_factory.mktemp("qwen")
    hf_dir = tmp / "hf"
    qwen2_vl(hf_dir, seed=2)
    tok, images = qwen_folder(hf_dir)
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


# ---------------------------------------------------------------- conversations: system message and history

#: a two-turn conversation with a system message, the image in the first user message
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "And behind it?"}]},
]


def _openai(messages: list[dict], image: bytes) -> list[dict]:
    """transformers' chat format -> an OpenAI request's messages (the image as a data URL)."""
    from test_server import data_url

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": data_url(image)}} if c["type"] == "image" else c
                       for c in content]
        out.append({"role": m["role"], "content": content})
    return out


def test_vlm_serve_reads_the_system_message_and_history_as_transformers(tmp_path: Path) -> None:
    """An imported LLaVA folder with its chat template: the whole conversation (system message, an
    earlier turn) reaches the model, token for token as transformers' apply_chat_template + generate."""
    from hf_tiny import llava
    from test_import_folder import LLAVA_TEMPLATE, char_tokenizer

    hf_dir = tmp_path / "hf"
    llava(transformers, hf_dir, seed=7)  # a seed whose answers differ by conversation
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                resample=3)
    transformers.LlavaProcessor(image_processor=images, tokenizer=char_tokenizer(), patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=LLAVA_TEMPLATE).save_pretrained(str(hf_dir))
    image = tmp_path / "wide.png"
    hf_tiny.noise_image(image, (52, 30))
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    wants = []
    for convo in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]):
        hf_convo = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str)
                    else {**m, "content": [{**c, "path": str(image)} if c["type"] == "image" else c
                                           for c in m["content"]]} for m in convo]
        inputs = processor.apply_chat_template(hf_convo, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        wants.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert len(set(wants)) == 3  # the system message and the history change the answer

    spec = tmp_path / "m.vlm"
    assert runner.invoke(app, ["import-hf", str(hf_dir), "-o", str(spec)]).exit_code == 0
    assert runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")]).exit_code == 0
    with Server(create_app(load_session(tmp_path / "built"))) as s:
        got = []
        for convo in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]):
            body = {"model": "m", "messages": _openai(convo, image.read_bytes()), "max_tokens": NEW, "temperature": 0}
            r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["message"]["content"].strip())
        assert got == wants

        # what the processor cannot lay out as the conversation says is refused, not approximated
        png = image.read_bytes()
        for messages, said in (
            (_openai(CONVERSATION, png)[:3], "last message must be the user's"),
            (_openai([CONVERSATION[1], CONVERSATION[3]], png), "two user messages in a row"),
            (_openai([CONVERSATION[3], CONVERSATION[2], CONVERSATION[1]], png), "first user message"),
            ([*_openai(CONVERSATION[1:2], png), {"role": "assistant", "content": "x"}, CONVERSATION[0],
              CONVERSATION[3]], "before the conversation"),
            ([{"role": "tool", "content": "x"}], "message role"),
        ):
            r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=60)
            assert r.status_code == 400 and said in r.json()["error"]["message"], (said, r.text)

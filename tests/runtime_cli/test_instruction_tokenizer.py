"""InstructBLIP end to end: a model folder with a `qformer_tokenizer/` gives its Q-Former the question
(in the Q-Former's own vocabulary) in `answer`, `vlm generate` and the server, exactly as a direct
`generate(..., instruction=...)` call does."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.checkpoint import save_model_dir
from vlmspec.runtime.connectors.base import Instruction
from vlmspec.runtime.inference import answer
from vlmspec.runtime.inputs.synth import corpus
from vlmspec.runtime.inputs.tokenizer import train_tokenizer
from vlmspec.runtime.model import build_model
from vlmspec.runtime.session import load_session

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["what", "color", "colour", "is", "the", "shape", "which", "?", "a", "circle", "square", "red", "blue"]


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("instructblip")
    analysis = load_analysis(f"{ROOT}/specs/instructblip-vicuna-7b.vlm:instructblip_vicuna_7b_tiny")[0]
    tok = train_tokenizer(corpus(), 400)
    qtok = _bert_tokenizer(tmp / "bert")
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    save_model_dir(model, analysis, tmp / "model", tokenizer=tok, instruction_tokenizer=qtok)
    return tmp / "model"


QUESTIONS = ["what color is the shape?", "which shape is it?"]


def test_answer_passes_the_instruction(folder: Path) -> None:
    session = load_session(folder)
    model, proc = session.model, session.processor
    assert proc.instruction_tokenizer is not None
    images = [_png((200, 30, 30)), _png((30, 30, 200))]
    batch = proc.generation_batch(QUESTIONS, images)
    ins = batch["instruction"]
    want_ids = proc.instruction_tokenizer(QUESTIONS, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ins.ids, want_ids) and ins.ids[0, 0] == proc.instruction_tokenizer.cls_token_id
    # the instruction reaches the Q-Former: the visual tokens depend on it
    with torch.no_grad():
        with_ins = model.encode_images(batch["pixel_values"], ins)
        without = model.encode_images(batch["pixel_values"], None)
    assert not torch.allclose(next(iter(with_ins.values())), next(iter(without.values())))
    got = answer(session, QUESTIONS, images, max_new_tokens=6)
    with torch.no_grad():
        new = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], instruction=Instruction(ins.ids, ins.mask),
                             max_new_tokens=6, eos_token_id=proc.eos_id)
    expect = []
    for row in new.tolist():
        kept = row[: row.index(proc.eos_id)] if proc.eos_id in row else row
        expect.append(proc.decode(kept))
    assert got == expect


def test_server_passes_the_instruction(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from test_server import Server, chat_body

    from vlmspec.runtime.serve import ServeConfig, create_app

    model = load_session(folder)
    image = _png((30, 160, 30))
    want = answer(model, [QUESTIONS[0]], [image], max_new_tokens=6)[0]
    import httpx

    with Server(create_app(model, ServeConfig(max_batch=4))) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(QUESTIONS[0], image, max_tokens=6), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want

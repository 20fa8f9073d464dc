"""The server's `boxes` field: a chat completion of a model that declares `boxes = ...` carries the boxes its
answer holds, in the sent image's pixels; a model without the declaration has no such field."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from test_server import Server, chat_body  # the server test helpers (pytest puts this folder on the path)

from vlmspec.runtime.grounding import message_boxes
from vlmspec.runtime.serve import ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[2]
MINIGPT = f"{ROOT}/specs/minigpt-v2-7b.vlm:minigpt_v2_7b_tiny"
LLAVA = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"
MODEL_DIRS: dict[str, str] = {}  # model name -> the folder `_session` saved it in (the CLI test reads it)


def _png(size=(80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _session(spec: str, image_token: str, tmp: Path):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.session import load_session

    analysis, _ = load_analysis(spec)
    tok = train_tokenizer([*corpus(), "{<10><20><30><40>}"], 400,
                          ["<image>", image_token, *analysis.ir.settings.task_tokens])
    torch.manual_seed(0)
    m = build_model(analysis, image_token_id=tok.convert_tokens_to_ids(image_token))
    save_model_dir(m, analysis, tmp / "m", tokenizer=tok)
    MODEL_DIRS[analysis.ir.name] = str(tmp / "m")
    return load_session(tmp / "m")


@pytest.fixture(scope="module")
def minigpt(tmp_path_factory):
    return _session(MINIGPT, "<ImageHere>", tmp_path_factory.mktemp("minigpt"))


def test_boxes_field_of_a_grounding_model(minigpt) -> None:
    with Server(create_app(minigpt, ServeConfig())) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body("[refer] the red box", image=_png()), timeout=60)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert isinstance(message["boxes"], list)
    assert message["boxes"] == message_boxes(minigpt, message["content"], _png())


def test_streamed_boxes_ride_on_the_last_chunk(minigpt) -> None:
    """Streamed, the boxes of the whole answer come with the chunk that carries `finish_reason` (only the whole
    answer can be read for them); the content chunks carry none."""
    with Server(create_app(minigpt, ServeConfig())) as s, httpx.stream(
            "POST", f"{s.url}/v1/chat/completions", timeout=60,
            json={**chat_body("[refer] the red box", image=_png()), "stream": True}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] is not None and last["delta"]["boxes"] == message_boxes(minigpt, content, _png())
    assert not any("boxes" in c["choices"][0]["delta"] for c in chunks[:-1])


def test_message_boxes_reads_the_answer_in_image_pixels(minigpt) -> None:
    assert message_boxes(minigpt, "<p>red box</p> {<25><25><75><75>}", _png()) == [
        {"label": "red box", "x1": 20.0, "y1": 10.0, "x2": 60.0, "y2": 30.0}]
    assert message_boxes(minigpt, "{<25><25><75>", _png()) == []          # half-written: skipped
    assert message_boxes(minigpt, "{<25><25><75><75>}", None) == []       # no image: no pixels to be in


def test_no_boxes_field_without_a_declaration(tmp_path_factory) -> None:
    llava = _session(LLAVA, "<image>", tmp_path_factory.mktemp("llava"))
    with Server(create_app(llava, ServeConfig())) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(image=_png()), timeout=60)
    assert r.status_code == 200 and "boxes" not in r.json()["choices"][0]["message"]
    (tmp_path_factory.getbasetemp() / "a.png").write_bytes(_png())
    from typer.testing import CliRunner

    from vlmspec.cli import app

    r = CliRunner().invoke(app, ["generate", MODEL_DIRS["llava_1_5_7b_tiny"], "--image",
                                 str(tmp_path_factory.getbasetemp() / "a.png"), "-p", "where?", "--boxes"])
    assert r.exit_code != 0 and "E0627" in r.output, r.output


def test_cli_generate_boxes(minigpt, tmp_path: Path) -> None:
    """`vlm generate --boxes --json` prints the answer and the boxes it holds; `--boxes` with a model that
    declares none is E0627."""
    from typer.testing import CliRunner

    from vlmspec.cli import app

    (tmp_path / "a.png").write_bytes(_png())
    r = CliRunner().invoke(app, ["generate", MODEL_DIRS["minigpt_v2_7b_tiny"], "--image", str(tmp_path / "a.png"), "-p",
                                 "[refer] the red box", "--boxes", "--json", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["boxes"] == message_boxes(minigpt, got["text"], _png())
    r = CliRunner().invoke(app, ["generate", MODEL_DIRS["minigpt_v2_7b_tiny"], "--image", str(tmp_path / "a.png"), "-p",
                                 "[refer] the red box", "--boxes", "--max-new-tokens", "8"])
    assert r.exit_code == 0 and ("boxes in" in r.output or "(no box)" in r.output), r.output


def test_streamed_boxes_of_an_answer_that_holds_one(minigpt) -> None:
    """The stream's generator itself, fed an answer that does hold a box: the last chunk's delta has it in the
    sent image's pixels (80 x 40), with its phrase."""
    import asyncio

    from vlmspec.runtime.serve.app import _sse
    from vlmspec.runtime.serve.engine import GenRequest

    async def run() -> list[dict]:
        req = GenRequest("[refer] the red box", _png(), stream=True)
        req.deltas = asyncio.Queue()
        answer = "<p>red box</p> {<25><25><75><75>}"
        for piece in (answer[:10], answer[10:], None):
            req.deltas.put_nowait(piece)
        req.text, req.finish_reason = answer, "stop"
        out = [x async for x in _sse(req, "id", 0, "m", lambda r: message_boxes(minigpt, r.text, r.image))]
        return [json.loads(x[6:]) for x in "".join(out).split("\n\n") if x.startswith("data: {")]

    chunks = asyncio.run(run())
    assert chunks[-1]["choices"][0]["delta"] == {"boxes": [
        {"label": "red box", "x1": 20.0, "y1": 10.0, "x2": 60.0, "y2": 30.0}]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

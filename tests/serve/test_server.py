"""A real uvicorn on 127.0.0.1 and real HTTP clients (httpx, the official `openai` package)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from vlmspec.runtime.serve import ServeConfig, create_app
from vlmspec.runtime.session import Session

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"


def _png(color=(200, 30, 30), size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.session import load_session

    analysis, _ = load_analysis(TINY)
    tok = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    m = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model_dir(m, analysis, out, tokenizer=tok)
    return load_session(out)


class Server:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chat_body(text="What color is the shape?", image: bytes | None = None, **kw) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **kw}


@pytest.fixture(scope="module")
def server(model):
    with Server(create_app(model, ServeConfig(max_body=2 * 1024 * 1024, max_pixels=512 * 512))) as s:
        yield s


def test_completion_models_health_metrics(server, model) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(image=_png()), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 8
    # the same answer as generating in-process
    from vlmspec.runtime.inference import answer

    direct = answer(model, ["What color is the shape?"], [_png()], max_new_tokens=8)
    assert body["choices"][0]["message"]["content"] == direct[0]
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "llava_1_5_7b_tiny"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "vlmspec_requests_total" in metrics and "vlmspec_image_cache_misses_total" in metrics


def test_streamed_completion(server) -> None:
    pieces, finish = [], None
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body(image=_png(), stream=True),
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"] or finish
    full = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(image=_png()), timeout=30).json()
    assert "".join(pieces) == full["choices"][0]["message"]["content"]
    assert finish in ("stop", "length")


def test_openai_client(server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    resp = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What shape is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(_png((0, 0, 200)))}}]}])
    assert resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What shape is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(_png((0, 0, 200)))}}]}])
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == resp.choices[0].message.content


def test_n_is_refused_and_usage_is_streamed_when_asked(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json=chat_body(image=_png(), n=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # never one choice for two asked
    assert httpx.post(url, json=chat_body(image=_png(), n=1)).status_code == 200
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What shape is this?"},
                                               {"type": "image_url", "image_url": {"url": data_url(_png())}}]}]))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = httpx.post(url, json=chat_body("What shape is this?", image=_png(), max_tokens=4, temperature=0)).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert {k: getattr(last.usage, k) for k in whole["usage"]} == whole["usage"]


def test_malformed_requests(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"messages": []})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "`messages` must be a non-empty list", "type": "invalid_request_error", "param": "messages",
        "code": None}
    r = httpx.post(url, json=chat_body(max_tokens=0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and r.json()["error"]["code"] is None
    assert r.json()["error"]["message"].startswith("`max_tokens` must be an integer in [1, ")
    body = chat_body()
    body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}})
    r = httpx.post(url, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "remote_image_unsupported"


def test_missing_and_bad_images(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    body = chat_body()
    body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "/no/such/file.png"}})
    r = httpx.post(url, json=body)
    assert r.status_code == 400 and "local image files are disabled" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages" and r.json()["error"]["code"] is None
    r = httpx.post(url, json=chat_body(image=b"not a png"), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "E0502"


def test_oversized_images(server) -> None:
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, json=chat_body(image=_png(size=1024)), timeout=30)  # 1 M pixels > 512x512
    assert r.status_code == 400 and r.json()["error"]["code"] == "E0503"
    huge = b"x" * (3 * 1024 * 1024)
    r = httpx.post(url, content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_api_key(model) -> None:
    with Server(create_app(model, ServeConfig(api_key="s3cret"))) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(image=_png()))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(image=_png()),
                       headers={"authorization": "Bearer s3cret"}, timeout=30)
        assert r.status_code == 200


class Slow(torch.nn.Module):
    """The model, 50 ms slower per forward: keeps the queue busy long enough to fill."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.image_token_id = inner.image_token_id
        self.in_sequence = inner.in_sequence

    def forward(self, **kw):
        time.sleep(0.05)
        return self.inner(**kw)


def test_queue_full_returns_503(model) -> None:
    slow = Session(model.analysis, Slow(model.model), model.tokenizer)
    app = create_app(slow, ServeConfig(max_queue=1, max_batch=1, max_wait_ms=0))
    with Server(app) as s:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*[client.post(f"{s.url}/v1/chat/completions",
                                                          json=chat_body(image=_png(), max_tokens=6))
                                              for _ in range(8)])

        codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}

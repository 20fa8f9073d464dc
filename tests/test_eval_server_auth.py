"""`vlm eval --server URL --api-key KEY` against the real `vlm serve` app on 127.0.0.1 that requires a key:
with the key (flag or OPENAI_API_KEY) it scores; without it, or with a wrong one, one line `E0555` and exit 1.
The key never shows in the output or the results file."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmspec.cli import main
from vlmspec.runtime.inputs.synth import COLORS
from vlmspec.runtime.serve import ServeConfig, create_app

ROOT = Path(__file__).resolve().parent.parent
TINY = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model behind `create_app(..., ServeConfig(api_key=KEY))` on a real uvicorn."""
    import uvicorn

    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.session import load_session

    analysis, _ = load_analysis(TINY)
    tok = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_model_dir(model, analysis, folder, tokenizer=tok)
    app = create_app(load_session(folder), ServeConfig(api_key=KEY))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def vqa(tmp_path: Path) -> Path:
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), COLORS[color]).save(tmp_path / name)
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps({"image": img, "question": "What color is the shape?", "answers": [ans]}) + "\n"
                            for img, ans in (("a.png", "red"), ("b.png", "blue"))))
    return path


def vlm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`vlm ARGS` through the real entry point (`main`, which turns errors into diagnostics and exit codes)."""
    monkeypatch.setattr(sys, "argv", ["vlm", *args])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out + captured.err


def test_eval_server_with_api_key(served: str, vqa: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    common = ["eval", "--server", served, "--data", str(vqa), "--max-new-tokens", "2", "--batch-size", "2"]

    # --api-key: scores both samples; the key is in neither the output nor the results file
    out_json = tmp_path / "r.json"
    code, text = vlm(monkeypatch, capsys, *common, "--api-key", KEY, "-o", str(out_json))
    assert code == 0, text
    assert "vqa_accuracy" in text and KEY not in text
    results = json.loads(out_json.read_text())
    assert len(results["samples"]) == 2 and 0 <= results["metrics"]["vqa_accuracy"] <= 100
    assert results["server"] == served and KEY not in out_json.read_text()

    # no key: one line E0555 with the hint, exit 1, no traceback, nothing scored
    code, text = vlm(monkeypatch, capsys, *common)
    assert code == 1
    assert "error[E0555]" in text and "needs an API key (HTTP 401)" in text and "--api-key" in text
    assert "OPENAI_API_KEY" in text and "Traceback" not in text and "vqa_accuracy" not in text

    # a wrong key: refused, and the (wrong) key is not echoed
    code, text = vlm(monkeypatch, capsys, *common, "--api-key", "sk-wrong-key")
    assert code == 1 and "error[E0555]" in text and "refused the API key" in text and "sk-wrong-key" not in text

    # OPENAI_API_KEY is the default
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    code, text = vlm(monkeypatch, capsys, *common)
    assert code == 0 and "vqa_accuracy" in text and KEY not in text, text

    # the help names the option and the variable, never the variable's value
    code, text = vlm(monkeypatch, capsys, "eval", "--help")
    assert code == 0 and "--api-key" in text and "OPENAI_API_KEY" in text and KEY not in text


@pytest.mark.parametrize("use_httpx", [True, False])
def test_client_sends_the_key_and_maps_403(use_httpx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both transports (httpx, urllib) send `Authorization: Bearer KEY`; a 403 is E0555 too, without the key."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vlmspec.diagnostics import UserInputError
    from vlmspec.evaluation.server import ChatClient

    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == f"Bearer {KEY}"
            data = json.dumps({"choices": [{"message": {"content": "red"}}]} if ok else {"error": "no"}).encode()
            self.send_response(200 if ok else 403)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    if not use_httpx:
        monkeypatch.setitem(sys.modules, "httpx", None)   # `import httpx` raises ImportError: urllib is used
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client = ChatClient(url, api_key=KEY)
        assert (client._httpx is not None) == use_httpx and KEY not in repr(client)
        assert client.complete("q", b"png", 2) == "red"
        for key in ("sk-wrong-key", None):
            with pytest.raises(UserInputError) as e:
                ChatClient(url, api_key=key).complete("q", b"png", 2)
            (d,) = e.value.diagnostics
            assert d.code == "E0555" and "HTTP 403" in d.message and "OPENAI_API_KEY" in (d.help or "")
            assert "sk-wrong-key" not in str(e.value)
        assert seen == [f"Bearer {KEY}", "Bearer sk-wrong-key", None]
    finally:
        httpd.shutdown()
        httpd.server_close()

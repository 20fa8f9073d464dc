"""Every tiny spec in specs/ builds into a folder that reads prompts with no other flag: `vlm build SPEC -o D`
then `vlm generate D --image x.png --prompt ...` answers from the CLI, and the server built from the same
folder answers a chat request. A spec that names no tokenizer gets the built-in byte-level one."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = sorted(f"{p}:{p.stem.replace('-', '_').replace('.', '_')}_tiny" for p in (ROOT / "specs").glob("*.vlm"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.new("RGB", (45, 30), (200, 40, 40)).save(path)  # not the model's size, not square
    return path


@pytest.mark.parametrize("spec", TINY, ids=[s.split(":")[1] for s in TINY])
def test_build_then_generate_and_serve_need_no_flag(spec, image, tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["build", spec, "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "tokenizer: built-in byte-level" in r.output
    if "fusion contrastive(" in Path(spec.split(":")[0]).read_text():  # CLIP / SigLIP embed, they never answer
        r = runner.invoke(app, ["generate", str(tmp_path / "m"), "--image", str(image), "--prompt", "a red shape"])
        assert r.exit_code == 1 and "E0615" in r.output and "Traceback" not in r.output, r.output
        return
    audio = "audio " in Path(spec.split(":")[0]).read_text()  # an audio-only model hears a clip instead
    if audio:
        from vlmspec.runtime.inputs.audio import tone

        image = tmp_path / "tone.wav"
        image.write_bytes(tone(0.5))
    r = runner.invoke(app, ["generate", str(tmp_path / "m"), "--audio" if audio else "--image", str(image),
                            "--prompt", "What color is it?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    # a text-only prompt is answered, as the server answers a chat request without an image
    r = runner.invoke(app, ["generate", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output

    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from test_server import Server

    from vlmspec.runtime.serve import ServeConfig, create_app
    from vlmspec.runtime.session import load_session

    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What color is it?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    if audio:  # OpenAI's `input_audio` part
        body["messages"][0]["content"][1] = {"type": "input_audio", "input_audio": {
            "data": base64.b64encode(image.read_bytes()).decode(), "format": "wav"}}
    session = load_session(tmp_path / "m")
    if getattr(session.analysis.ir.language.config, "encoder_decoder", False):
        # the continuous-batching engine holds decoder-only rows: an encoder-decoder model is refused in one line
        from vlmspec.diagnostics import UserInputError

        with pytest.raises(UserInputError, match="E0564"):
            create_app(session, ServeConfig(max_batch=2))
        return
    with Server(create_app(session, ServeConfig(max_batch=2))) as s:
        reply = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")

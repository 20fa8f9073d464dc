"""`vlm export-hf` writes a folder that needs no hand edits to serve: `AutoProcessor` +
`AutoModelForImageTextToText` give `vlm generate`'s answers and stop at the end token, the chat template
yields the ids vlmspec's `Processor` builds, and `transformers serve` answers as `vlm serve` does."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlmspec.cli import app  # noqa: E402
from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.runtime.checkpoint import save_model_dir  # noqa: E402
from vlmspec.runtime.inputs.tokenizer import train_tokenizer  # noqa: E402
from vlmspec.runtime.model import build_model  # noqa: E402
from vlmspec.runtime.session import load_session  # noqa: E402
from vlmspec.runtime.weights.export import export_hf  # noqa: E402

runner = CliRunner()

SPEC = """
model m {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64
                      feature = layer(-2).patches  resize = bilinear  FIT }
  connector proj = mlp(clip -> llm) { layers = 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }
  fusion prefix(proj -> llm)
  SETTINGS
}
"""
QA = [("what colour is the circle?", "red"), ("what shape is it?", "a green square"),
      ("how many shapes?", "three")]


def _spec(settings: str = 'prompt = "USER: {image}\\n{q} ASSISTANT:"', fit: str = "") -> str:
    return SPEC.replace("SETTINGS", settings).replace("FIT", fit)


def _tokenizer():
    corpus = [f"USER: {q} ASSISTANT: {a}" for q, a in QA] * 6 + ["Answer briefly.", "Question: Answer:"] * 4
    return train_tokenizer(corpus, 300)


def _image(i: int = 0) -> Image.Image:
    """A fixed non-square noise image per index."""
    g = torch.Generator().manual_seed(i)
    pixels = torch.randint(0, 256, (28, 40 + 4 * i, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _model_dir(tmp: Path, spec_text: str, train_steps: int = 0) -> Path:
    """A tiny LLaVA folder; with `train_steps`, fitted to answer QA and stop (the answers end with eos)."""
    spec = tmp / "m.vlm"
    spec.write_text(spec_text)
    analysis = load_analysis(str(spec))[0]
    tok = _tokenizer()
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    if train_steps:
        from vlmspec.runtime.inputs.processor import Processor

        proc = Processor(analysis, tok)
        px, _ = proc.images([_image(i) for i in range(len(QA))])
        batch = proc.training_batch([proc.encode_example(q, a) for q, a in QA], px)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(train_steps):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        model.eval()
    return save_model_dir(model, analysis, tmp / "vlm", tokenizer=tok, spec_text=spec_text)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(vlmspec folder, `vlm export-hf` of it) for a model that answers QA and stops at eos."""
    tmp = tmp_path_factory.mktemp("trained")
    settings = 'prompt = "USER: {image}\\n{q} ASSISTANT:"\n  system = "Answer briefly."'
    folder = _model_dir(tmp, _spec(settings), train_steps=120)
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp / "hf")])
    assert r.exit_code == 0, r.output
    return folder, tmp / "hf"


def test_auto_classes_give_vlm_generate_answers_and_stop_at_eos(trained, tmp_path: Path) -> None:
    folder, hf_dir = trained
    assert {"chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "config.json", "model.safetensors"} <= {p.name for p in hf_dir.iterdir()}
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    ours = load_session(folder).processor
    eos = ours.eos_id
    for i, (q, a) in enumerate(QA):
        path = tmp_path / f"{i}.png"
        _image(i).save(path)
        r = runner.invoke(app, ["generate", str(folder), "--image", str(path), "--prompt", q])
        assert r.exit_code == 0, r.output
        cli_answer = r.output.strip()
        assert cli_answer == a  # the model learned to answer and stop

        messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                                 {"type": "text", "text": q}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours.encode_prompt(q)  # bos, system, image tokens, prompt
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32)  # greedy, eos and pad from generation_config.json
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert new[-1] == eos and len(new) < 32  # stopped at the end token
        assert processor.decode(new, skip_special_tokens=True).strip() == cli_answer


@pytest.mark.parametrize("settings", [
    'prompt = "USER: {image}\\n{q} ASSISTANT:"\n  answer = " {a}</s>"',
    'prompt = "Question: {q} Answer:"\n  system = "Answer briefly."',           # no {image}: images first
    'prompt = "<|user|>{q}\\n{image}<|end|>\\n<|assistant|>"\n  answer = "{a}<|end|>"',
])
def test_chat_template_yields_processor_ids(settings: str, tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, _spec(settings))
    hf_dir = export_hf(folder, tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    ours = load_session(folder).processor
    img = _image()
    first = [{"role": "user", "content": [{"type": "text", "text": "what shape is it?"}, {"type": "image", "image": img}]}]
    ids = processor.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"][0] == ours.encode_prompt("what shape is it?")
    turns = [*first, {"role": "assistant", "content": "a green square"},
             {"role": "user", "content": "how many shapes?"}, {"role": "assistant", "content": "three"}]
    ids = processor.apply_chat_template(turns, tokenize=True, return_dict=True)
    assert ids["input_ids"][0] == ours.encode_turns([("what shape is it?", "a green square"),
                                                     ("how many shapes?", "three")]).input_ids
    # a conversation that goes on (what `vlm serve` sends the model), with a system message of its own
    asked = [{"role": "system", "content": "Be terse."}, *turns[:3]]
    ids = processor.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"][0] == ours.encode_chat([("what shape is it?", "a green square")], "how many shapes?",
                                                   system="Be terse.")


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_image_processor_does_the_spec_fit(fit: str, tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, _spec(fit=f"fit = {fit}"))
    hf_dir = export_hf(folder, tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    ours = load_session(folder).processor
    for img in (_image(0), _image(0).transpose(Image.Transpose.TRANSPOSE)):
        hf = processor(images=img, text="<image>", return_tensors="pt")["pixel_values"]
        assert (hf - ours.transform(img)[None]).abs().max() <= 1e-4


@pytest.mark.parametrize(("edit", "named"), [
    (("fusion prefix(proj -> llm)", "fusion prefix(proj -> llm) { prefix_attention = bidirectional }"),
     "prefix_attention = bidirectional"),
    (("max_positions = 128 }", "max_positions = 128  quantize = int8 }"), "quantize = int8"),
    (("connector proj = mlp(clip -> llm) { layers = 2 }", "connector proj = mlp(clip -> llm) { layers = 3 }"),
     "connector `proj`"),
    (("feature = layer(-2).patches", "feature = pooled"), "feature = pooled"),  # one vector: no select strategy
])
def test_a_spec_llava_cannot_express_is_refused_in_one_line(edit: tuple[str, str], named: str,
                                                             tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, _spec().replace(*edit))
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = next(x for x in r.output.splitlines() if "error[E0586]" in x)
    assert named in line and "does not fit the LLaVA layout" in line
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- transformers serve vs vlm serve


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, body: dict) -> tuple[str, str | None]:
    """(content, finish_reason) of a streamed chat completion."""
    import httpx

    text, finish = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish


def _wait(url: str, proc: subprocess.Popen | None = None, seconds: float = 120) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not start")


def test_transformers_serve_answers_as_vlm_serve(trained, tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="`transformers serve` needs the bench extra (transformers[serving])")
    exe = Path(sys.executable).with_name("transformers")
    if not exe.is_file():
        pytest.skip("no `transformers` command beside the interpreter")
    folder, hf_dir = trained
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    ports = _port(), _port()
    procs = [subprocess.Popen([sys.executable, "-m", "vlmspec.cli", "serve", str(folder), "--port", str(ports[0]),
                               "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([str(exe), "serve", str(hf_dir), "--device", "cpu", "--host", "127.0.0.1",
                               "--port", str(ports[1]), "--log-level", "error"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc in zip(urls, procs, strict=True):
            _wait(url, proc)
        for i, (q, a) in enumerate(QA):
            buf = io.BytesIO()
            _image(i).save(buf, "PNG")
            image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body = {"model": str(hf_dir), "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}]}]}
            ours, theirs = (_stream(url, body) for url in urls)
            assert ours == (a, "stop")
            assert (theirs[0].strip(), theirs[1]) == ours  # vlm serve strips the leading space it decodes
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def test_a_spec_chat_template_is_exported_verbatim(tmp_path: Path) -> None:
    from vlmspec.compiler.schema.stage import Settings

    if "chat_template" not in Settings.model_fields:
        pytest.skip("this tree's specs have no `chat_template` setting")
    template = "{{ bos_token }}{% for m in messages %}USER: {{ m['content'] }} ASSISTANT:{% endfor %}"
    folder = _model_dir(tmp_path, _spec(f'chat_template = "{template}"'))
    hf_dir = export_hf(folder, tmp_path / "hf")
    assert (hf_dir / "chat_template.jinja").read_text() == template

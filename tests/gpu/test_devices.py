"""Every command on the device it is given: build, generate, serve, eval and train place their inputs on
the model's device, and a stage's `precision` is autocast there (bf16, or fp16 with loss scaling).

Each test runs on the CPU everywhere (the proxy that keeps the code paths honest on machines without a
GPU) and again on CUDA, marked `gpu`, when torch sees one; `scripts/gpu_check.sh` runs the `gpu` ones.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.devices import autocast, grad_scaler, move, resolve_device

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False here)"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shapes: Path) -> Path:
    """The tiny LLaVA built on the CPU with a tokenizer, as `vlm build` writes it."""
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("devices")
    train_tokenizer(corpus(), 400, extra_special=["<image>"]).save_pretrained(root / "tok")
    r = runner.invoke(app, ["build", TINY, "-o", str(root / "model"), "--tokenizer", str(root / "tok")])
    assert r.exit_code == 0, r.output
    return root / "model"


def _image(shapes: Path) -> Path:
    return next(shapes.rglob("*.png"))


@pytest.mark.parametrize("device", DEVICES)
def test_generate_on_the_device(device: str, model_dir: Path, shapes: Path) -> None:
    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.session import load_session

    session = load_session(model_dir, device=device)
    assert session.device.type == device
    image = str(_image(shapes))
    got = answer(session, ["What colour is the shape?"], [image], max_new_tokens=6)
    want = answer(load_session(model_dir, device="cpu"), ["What colour is the shape?"], [image], max_new_tokens=6)
    assert got == want
    r = runner.invoke(app, ["generate", str(model_dir), "--device", device, "--image", image,
                            "--prompt", "What colour is the shape?", "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == want[0].strip()


@pytest.mark.parametrize("device", DEVICES)
def test_serve_on_the_device(device: str, model_dir: Path, shapes: Path) -> None:
    from starlette.testclient import TestClient

    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.serve import ServeConfig, create_app
    from vlmspec.runtime.session import load_session

    session = load_session(model_dir, device=device)
    png = _image(shapes).read_bytes()
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the shape?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]}
    with TestClient(create_app(session, ServeConfig())) as client:
        r = client.post("/v1/chat/completions", json=body)
        sampled = client.post("/v1/chat/completions", json={**body, "temperature": 0.8, "seed": 3})
    assert r.status_code == 200, r.text
    assert sampled.status_code == 200, sampled.text
    want = answer(session, ["What colour is the shape?"], [Image.open(io.BytesIO(png))], max_new_tokens=6)
    assert r.json()["choices"][0]["message"]["content"] == want[0]


@pytest.mark.parametrize("device", DEVICES)
def test_eval_on_the_device(device: str, model_dir: Path, shapes: Path) -> None:
    r = runner.invoke(app, ["eval", str(model_dir), "--device", device, "--data", str(shapes / "test_vqa.jsonl"),
                            "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    assert "vqa" in r.output


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_on_the_device_in_its_precision(device: str, precision: str, shapes: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.vlm"
    spec.write_text(f"""
model tiny {{
  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 48  depth = 2  heads = 4  ffn = 96  vocab = 400  max_positions = 128 }}
  fusion prefix(proj -> llm)
  stage s {{ train proj, llm  freeze clip  batch 4  steps 3  precision {precision}  packing = true }}
}}
""")
    r = runner.invoke(app, ["train", str(spec), "--data", str(shapes / "train.json"), "-o", str(tmp_path / "run"),
                            "--device", device, "--workers", "0", "--save-every", "2"])
    assert r.exit_code == 0, r.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    r = runner.invoke(app, ["generate", str(tmp_path / "run" / "final"), "--device", device, "--image",
                            str(_image(shapes)), "--prompt", "What colour is the shape?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


def test_precision_changes_the_computation(shapes: Path, tmp_path: Path) -> None:
    """fp16 and bf16 are honoured, not ignored: the first step's loss differs from fp32's, slightly."""
    spec = """
model tiny {{
  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 48  depth = 2  heads = 4  ffn = 96  vocab = 400  max_positions = 128 }}
  fusion prefix(proj -> llm)
  stage s {{ train proj, llm  freeze clip  batch 4  steps 1  precision {p} }}
}}
"""
    first = {}
    for p in ("fp32", "bf16", "fp16"):
        (tmp_path / f"{p}.vlm").write_text(spec.format(p=p))
        r = runner.invoke(app, ["train", str(tmp_path / f"{p}.vlm"), "--data", str(shapes / "train.json"),
                                "-o", str(tmp_path / p), "--device", "cpu", "--workers", "0"])
        assert r.exit_code == 0, r.output
        first[p] = json.loads((tmp_path / p / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first["bf16"] != first["fp32"] and first["fp16"] != first["fp32"]
    assert first["bf16"] == pytest.approx(first["fp32"], rel=2e-2)
    assert first["fp16"] == pytest.approx(first["fp32"], rel=2e-2)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(VlmSpecError, match="E0556"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(VlmSpecError, match="no CUDA device"):
            resolve_device("cuda")


def test_cuda_without_a_gpu_is_a_clear_error(model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = runner.invoke(app, ["generate", str(model_dir), "--device", "cuda", "--prompt", "hi"])
    assert r.exit_code != 0
    assert "E0556" in r.output and "Traceback" not in r.output


def test_move_and_autocast() -> None:
    from vlmspec.runtime.connectors.base import Instruction

    batch = {"ids": torch.ones(2), "nested": [torch.zeros(1), ("x", torch.ones(1))],
             "instruction": Instruction(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)),
             "n": 3}
    moved = move(batch, torch.device("meta"))
    assert moved["ids"].is_meta and moved["nested"][0].is_meta and moved["nested"][1][1].is_meta
    assert moved["instruction"].ids.is_meta and moved["n"] == 3
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert grad_scaler(torch.device("cpu"), "fp16").is_enabled()
    assert not grad_scaler(torch.device("cpu"), "bf16").is_enabled()

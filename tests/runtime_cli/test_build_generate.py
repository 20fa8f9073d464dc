"""Every tiny spec in the library builds and generates from the CLI; `--device meta` allocates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import check_file
from vlmspec.runtime.inputs.synth import corpus
from vlmspec.runtime.inputs.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def tiny_refs() -> list[str]:
    refs = []
    for path in sorted((ROOT / "specs").glob("*.vlm")):
        for a in check_file(str(path)).analyses:
            if a.ir.name.endswith("_tiny"):
                refs.append(f"{path}:{a.ir.name}")
    return refs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(), 400, extra_special=["<image>", "[vqa]"]).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(p)
    return p


@pytest.mark.parametrize("ref", tiny_refs(), ids=lambda r: r.rsplit(":", 1)[1])
def test_tiny_spec_builds_and_generates(ref, tokenizer_dir, image, tmp_path) -> None:
    out = tmp_path / "model"
    r = runner.invoke(app, ["build", ref, "-o", str(out), "--tokenizer", str(tokenizer_dir)])
    assert r.exit_code == 0, r.output
    assert "matches" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == ref.rsplit(":", 1)[1] and (out / "model.safetensors").is_file()
    picture = ["--image", str(image)]
    if "fusion contrastive(" in Path(ref.rsplit(":", 1)[0]).read_text():  # CLIP / SigLIP: nothing to generate
        r = runner.invoke(app, ["generate", str(out), *picture, "--prompt", "a red shape"])
        assert r.exit_code == 1 and "E0615" in r.output and "Traceback" not in r.output, r.output
        return
    if "audio " in Path(ref.rsplit(":", 1)[0]).read_text():  # an audio-only model hears a clip, it sees nothing
        from vlmspec.runtime.inputs.audio import tone

        (tmp_path / "tone.wav").write_bytes(tone(0.5))
        picture = ["--audio", str(tmp_path / "tone.wav")]
    r = runner.invoke(app, ["generate", str(out), *picture, "--prompt", "What color is the shape?",
                            "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() != "" or r.output == "\n"


def test_meta_build_of_a_7b_spec_allocates_nothing() -> None:
    r = runner.invoke(app, ["build", f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b", "--device", "meta"])
    assert r.exit_code == 0, r.output
    assert "7,062,902,784 parameters" in r.output and "matches" in r.output


def test_generate_errors_are_one_line(tokenizer_dir, tmp_path) -> None:
    out = tmp_path / "m"
    runner.invoke(app, ["build", f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny", "-o", str(out),
                        "--tokenizer", str(tokenizer_dir)])
    r = runner.invoke(app, ["generate", str(out), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert r.exit_code == 1 and "E0501" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    r = runner.invoke(app, ["generate", str(out), "--image", str(bad), "--prompt", "hi"])
    assert r.exit_code == 1 and "E0502" in r.output
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "red").save(good)
    r = runner.invoke(app, ["generate", str(out), "--image", str(good), "--prompt", "word " * 300])
    assert r.exit_code == 1 and "E0504" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert r.exit_code == 1 and "E0540" in r.output

"""What cannot be exported or run is refused with one typed line (E0570-E0576), never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from export_helpers import SPECS, build, unexportable_refs

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.checkpoint import save_model_dir
from vlmspec.runtime.export import ExportedModel, export_model, to_tensorrt

LLAVA = f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny"


def code(e: pytest.ExceptionInfo) -> str:
    return e.value.diagnostics[0].code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    analysis, model = build(LLAVA, tokenizer)
    return save_model_dir(model, analysis, tmp_path_factory.mktemp("m") / "model", tokenizer=tokenizer)


def test_tensorrt_without_cuda_names_the_onnx_file(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError) as e:
        export_model(model_dir, tmp_path / "out", ["tensorrt"])
    text = str(e.value)
    assert code(e) == "E0570"
    assert text.startswith("error[E0570]: TensorRT export needs CUDA and torch_tensorrt") and "no CUDA device" in text
    assert str(tmp_path / "out" / "decoder_prefill.onnx") in text and "trtexec" in text
    assert len(e.value.diagnostics[0].message.splitlines()) == 1 and "Traceback" not in text
    assert not (tmp_path / "out").exists()  # refused before any work


def test_tensorrt_without_torch_tensorrt_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(to_tensorrt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError) as e:
        export_model(model_dir, tmp_path / "out", ["onnx", "tensorrt"])
    assert code(e) == "E0570" and "torch_tensorrt is not installed" in str(e.value)
    assert "no CUDA device" not in str(e.value)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"formats": ["torchscript"]}, "unknown export format `torchscript`"),
    ({"formats": []}, "no export format"),
    ({"max_len": 100_000}, "max_len must be in 2..256"),
    ({"max_len": 40}, "leaves no room: one image alone takes 64 tokens"),
    ({"dtype": "int3"}, "unknown dtype `int3`"),
    ({"quantize": "int8"}, "quantize applies to the tensorrt format only"),
    ({"quantize": "int2", "formats": ["pt2"]}, "unknown TensorRT quantization"),
])
def test_bad_options(model_dir, tmp_path, kwargs, needle):
    kwargs = {"formats": ["pt2"], **kwargs}
    with pytest.raises(UserInputError) as e:
        export_model(model_dir, tmp_path / "out", **kwargs)
    assert code(e) == "E0572" and needle in str(e.value)


def test_an_unrelated_folder_is_not_overwritten(model_dir, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError) as e:
        export_model(model_dir, target, ["pt2"])
    assert code(e) == "E0572" and (target / "notes.txt").read_text() == "keep me"


def test_live_model_needs_its_analysis(tokenizer, tmp_path):
    _, model = build(LLAVA, tokenizer)
    with pytest.raises(UserInputError) as e:
        export_model(model, tmp_path / "out", ["pt2"])
    assert code(e) == "E0572" and "Analysis" in str(e.value)


def test_runner_refuses_what_the_graph_cannot_check(exports, tmp_path):
    case = exports(LLAVA)
    runner = case.runner("pt2")
    ids, mask, px = case.input_ids, case.attention_mask, case.pixel_values
    wrong = ids.clone()
    wrong[0, wrong[0] == case.model.image_token_id] = case.model.image_token_id + 100
    for bad, needle in [
        (lambda: runner.generate(wrong, mask, px, max_new_tokens=4), "image tokens but the images give 64"),
        (lambda: runner.generate(ids, mask, px, max_new_tokens=500), "exceed the exported cache of 128"),
        (lambda: runner.generate(ids, mask, px[:1], max_new_tokens=4), "1 images for 2 prompts"),
        (lambda: runner.generate(ids, mask, max_new_tokens=4), "needs images"),
        (lambda: runner.generate(ids + 10_000, mask, px, max_new_tokens=4), "outside the vocabulary"),
    ]:
        with pytest.raises(UserInputError) as e:
            bad()
        assert code(e) == "E0575" and needle in str(e.value), str(e.value)


def test_folders_the_runner_cannot_use(exports, tmp_path):
    case = exports(LLAVA)
    with pytest.raises(UserInputError) as e:
        ExportedModel(tmp_path)
    assert code(e) == "E0574" and "no manifest.json" in str(e.value)
    with pytest.raises(UserInputError) as e:
        ExportedModel(case.out, "tensorrt")
    assert code(e) == "E0574" and "has no tensorrt artefacts" in str(e.value) and "pt2, onnx" in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(case.out, broken)
    (broken / "decoder_step.pt2").unlink()
    with pytest.raises(UserInputError) as e:
        ExportedModel(broken, "pt2")
    assert code(e) == "E0574" and "decoder_step.pt2 is missing" in str(e.value)


def test_cli_export_and_tensorrt_message(tmp_path) -> None:
    """`vlm export` from the command line; TensorRT without CUDA is one diagnostic naming the ONNX route."""
    import torch
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model

    root = Path(__file__).resolve().parents[2]
    analysis, _ = load_analysis(f"{root}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")
    tok = train_tokenizer(corpus(), 400)
    torch.manual_seed(0)
    save_model_dir(build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>")), analysis,
                   tmp_path / "m", tokenizer=tok)
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(tmp_path / "m"), "-o", str(tmp_path / "x"), "--format", "pt2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x" / "manifest.json").is_file() and (tmp_path / "x" / "decoder_step.pt2").is_file()
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["export", str(tmp_path / "m"), "-o", str(tmp_path / "t"), "--format", "tensorrt"])
        assert r.exit_code == 1 and "E0570" in r.output and "onnx" in r.output.lower()
        assert "Traceback" not in r.output


@pytest.mark.parametrize(("ref", "call"), [("llava-v1.6-mistral-7b.vlm:llava_v1_6_mistral_7b_tiny", "anyres"),
                                           ("internvl2.5-8b.vlm:internvl2_5_8b_tiny", "dynamic_tiles")])
def test_laid_out_model_is_refused(tokenizer, tmp_path, ref, call):
    """LLaVA-NeXT's and InternVL's tokens per image depend on the image's size: no fixed-shape halves, one
    typed line."""
    analysis, model = build(str(SPECS / ref), tokenizer)
    folder = save_model_dir(model, analysis, tmp_path / "model", tokenizer=tokenizer)
    with pytest.raises(UserInputError) as e:
        export_model(folder, tmp_path / "out", ["pt2"])
    assert code(e) == "E0571" and f"{call} layout" in str(e.value)
    assert len(e.value.diagnostics[0].message.splitlines()) == 1


@pytest.mark.parametrize("ref", unexportable_refs(), ids=lambda r: r.rsplit(":", 1)[1])
def test_every_unexportable_tiny_spec_is_refused_in_one_line(tokenizer, tmp_path, ref):
    """The tiny specs the export parity tests leave out (laid-out images, a Mamba or T5 language model,
    encoders at two resolutions, Pixtral's rows, ...) are refused by `export_model` itself, before any work,
    with one line saying which part and why."""
    analysis, model = build(ref, tokenizer)
    folder = save_model_dir(model, analysis, tmp_path / "model", tokenizer=tokenizer)
    with pytest.raises(UserInputError) as e:
        export_model(folder, tmp_path / "out", ["pt2"])
    assert code(e) == "E0571"
    assert len(e.value.diagnostics[0].message.splitlines()) == 1
    assert not (tmp_path / "out").exists()

"""`convnext` against transformers' `ConvNextModel`: a spec component with `weights = "DIR"` gives the
selected stage's feature map as tokens (row by row) within 1e-5 in fp32, at the nominal size and on a
non-square image; `vlm summary` counts the class's parameters (a tiny tower, ConvNeXt-L, and five
stages as ConvLLaVA's); `vlm build` + `vlm generate` answer from the image; bad specs are located errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-5
LM = ("  language llm = llama { width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  "
      "max_positions = 4096 }\n")
TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], image_size=64)
TINY_SPEC = "image_size = 64  dims = [8, 16, 24, 32]  depths = [1, 2, 1, 1]"


def reference(out: Path, **cfg):
    """A randomised tiny ConvNeXt saved to `out`: (the model, its meta-device parameter count)."""
    _quiet(transformers)
    config = transformers.ConvNextConfig(**{**TINY, **cfg})
    torch.manual_seed(0)
    m = transformers.ConvNextModel(config).eval()
    randomise(m)
    m.save_pretrained(str(out))
    return m, meta_count(config)


def meta_count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.ConvNextModel(config).parameters())


def spec_text(enc: str, name: str = "m") -> str:
    return (f"model {name} {{\n  vision enc = convnext {{ {enc} }}\n  connector proj = mlp(enc -> llm)\n{LM}"
            "  fusion prefix(proj -> llm)\n}\n")


def analysed(tmp: Path, enc: str, name: str = "m"):
    from vlmspec.compiler.compile import load_analysis

    (tmp / f"{name}.vlm").write_text(spec_text(enc, name))
    return load_analysis(f"{tmp / name}.vlm:{name}")[0]


@pytest.mark.parametrize(("attrs", "state"), [("", -1), ("out_stage = 2", 3), ("feature_norm = true", "normed")],
                         ids=["last-stage", "stage-2", "feature-norm"])
def test_convnext_features_match_transformers(tmp_path, attrs, state):
    from vlmspec.runtime.weights import build_with_weights

    hf, count = reference(tmp_path / "hf")
    analysis = analysed(tmp_path, f'{TINY_SPEC}  {attrs}  weights = "{tmp_path / "hf"}"')
    model, report = build_with_weights(analysis)
    assert report.ok and report.components["enc"].status == "loaded", str(report)
    assert sum(analysis.shapes.params["enc"].values()) == count  # `vlm summary` = the class's count
    ours = model.components["enc"]
    g = torch.Generator().manual_seed(1)
    for h, w in [(64, 64), (64, 96), (96, 32)]:  # nominal, then two non-square images
        px = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            out = hf(pixel_values=px, output_hidden_states=True)
            other = hf(pixel_values=torch.randn(2, 3, h, w, generator=g)).last_hidden_state
            got = ours(px)
        fmap = out.last_hidden_state if state in (-1, "normed") else out.hidden_states[state]
        ref = fmap.flatten(2).transpose(1, 2)
        if state == "normed":
            with torch.no_grad():
                ref = hf.layernorm(ref)
        assert got.grid == tuple(fmap.shape[-2:])
        assert got.x.shape == ref.shape and float((got.x - ref).abs().max()) <= TOL, (attrs, h, w)
        assert float((other - out.last_hidden_state).abs().max()) > 100 * TOL  # the reference sees the image
    stage = -1 if state in (-1, "normed") else state - 1
    assert analysis.shapes.out["enc"].tokens == (64 // (4 * 2 ** (stage % 4))) ** 2


def test_full_size_convnext_counts_as_transformers(tmp_path):
    """ConvNeXt-L (ConvLLaVA's tower) and a five-stage ConvNeXt (its added stage), on the meta device."""
    cases = {"large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
             "five": ([192, 384, 768, 1536, 3072], [3, 3, 27, 3, 3])}
    for name, (dims, depths) in cases.items():
        theirs = meta_count(transformers.ConvNextConfig(hidden_sizes=dims, depths=depths, num_stages=len(dims)))
        analysis = analysed(tmp_path, f"image_size = 1536  dims = {dims}  depths = {depths}", name)
        assert sum(analysis.shapes.params["enc"].values()) == theirs, name
        assert analysis.shapes.out["enc"].tokens == (1536 // (4 * 2 ** (len(dims) - 1))) ** 2


def test_build_and_generate_from_the_cli(tmp_path):
    """`vlm build` (the tower from its folder) then `vlm generate` on two images: the answers differ."""
    from PIL import Image
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    reference(tmp_path / "hf")
    tok = tmp_path / "tok"
    train_tokenizer(corpus(), 400, extra_special=["<image>"]).save_pretrained(tok)
    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text(f'{TINY_SPEC}  weights = "{tmp_path / "hf"}"'))
    runner = CliRunner()
    r = runner.invoke(app, ["summary", f"{spec}:m"])
    assert r.exit_code == 0 and "convnext" in r.output, r.output
    r = runner.invoke(app, ["build", f"{spec}:m", "-o", str(tmp_path / "built"), "--tokenizer", str(tok)])
    assert r.exit_code == 0, r.output
    red = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (220, 30, 30)).save(red)
    answers = []
    for image in (red, noise_image(tmp_path / "noise.png", (60, 80), colour=True)):
        r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", str(image), "--prompt",
                                "What is in the picture?", "--max-new-tokens", "8"])
        assert r.exit_code == 0, r.output
        answers.append(r.output)
    assert answers[0] != answers[1], answers


@pytest.mark.parametrize(("attrs", "code", "attr"), [
    ("dims = [8, 16, 24, 32]  depths = [1, 2, 1]", "E0240", "depths"),
    ("dims = [8, 16, 0, 32]  depths = [1, 1, 1, 1]", "E0240", "dims"),
    ("image_size = 60", "E0243", "image_size"),
    ("out_stage = 4", "E0244", "out_stage"),
    ("out_stage = 1  feature_norm = true", "E0244", "feature_norm"),
])
def test_bad_convnext_specs_are_located_errors(tmp_path, attrs, code, attr):
    from vlmspec.compiler.compile import check_file

    path = tmp_path / "bad.vlm"
    path.write_text(spec_text(attrs))
    diags = [d for d in check_file(str(path)).diagnostics if d.severity == "error"]
    assert [d.code for d in diags] == [code], [str(d) for d in diags]
    line = path.read_text().splitlines()[1]
    assert diags[0].span is not None and diags[0].span.line == 2
    start = line.index(f"{attr} =")  # the caret is under that attribute's value
    assert start < diags[0].span.col - 1 <= start + len(attr) + 3, (line, diags[0].span)


def test_a_programmatic_config_with_unequal_stages_is_refused():
    from vlmspec.compiler.schema.convnext import ConvNeXt
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.vision.convnext import ConvNeXtEncoder

    with pytest.raises(UserInputError) as e:
        ConvNeXtEncoder(ConvNeXt(dims=[8, 16], depths=[1]))
    assert e.value.diagnostics[0].code == "E0589"
    encoder = ConvNeXtEncoder(ConvNeXt(dims=[8, 16], depths=[1, 1], image_size=16))
    with pytest.raises(UserInputError) as e:
        encoder(torch.zeros(1, 3, 4, 4))
    assert e.value.diagnostics[0].code == "E0588"


@pytest.mark.parametrize("attrs", ["", "out_stage = 2  layer_scale = false"])
def test_paths_lora_and_checkpointing(tmp_path, attrs):
    from encoder_checks import assert_wired

    assert_wired(analysed(tmp_path, f"{TINY_SPEC}  {attrs}"))

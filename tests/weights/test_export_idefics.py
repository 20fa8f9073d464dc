"""IDEFICS: `vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for bit (with and
without the resampler, scalar and per-channel gates, cross-attention every 1, 2 or 3 layers, with and
without extra vocabulary rows), and transformers on the export answers as `vlm generate` does on the built
folder for non-square images. A hand-written IDEFICS spec (prompt and answer, no chat template) exports too;
what IDEFICS cannot hold is refused in one line (E0586).

transformers is driven through `AutoProcessor` + `AutoModelForImageTextToText` (which maps `idefics` to
`IdeficsForVisionText2Text`). IdeficsProcessor cannot take a rendered chat template (its
`apply_chat_template` leaves `<image>` in the text and appends the image after it), so the reference renders
the export's chat template with the tokenizer, splits it at `<image>` and hands the pieces and the image to
the processor, as IDEFICS' own usage does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import config_subset, export_round_trip, randomise  # noqa: E402
from test_import_folder import runner  # noqa: E402
from test_import_folder_qwen_idefics_mllama import (  # noqa: E402
    IDEFICS_TEMPLATE,
    QUESTION,
    idefics_reference,
    noise_image,
    tokenizer_with,
)
from test_parity_idefics import idefics  # noqa: E402

from vlmspec.cli import app  # noqa: E402

FAKE = "<fake_token_around_image>"
NEW = 12


def _hf_folder(hf_dir: Path, *, vocab: int = 128, fake: int = 128, image: int = 129, **kw) -> None:
    """A tiny IDEFICS checkpoint folder with a tokenizer naming `<fake_token_around_image>` and `<image>`,
    the instruct-style chat template and a non-default image processor."""
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    idefics(hf_dir, **kw)
    tok = tokenizer_with(max(vocab, image + 1), {fake: FAKE, image: "<image>"})
    tok.chat_template = IDEFICS_TEMPLATE
    images = IdeficsImageProcessorPil(image_size=32, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    transformers.IdeficsProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(hf_dir))


def _transformers_answers(export: Path, images: list[Path]) -> list[str]:
    """Greedy answers of the export through transformers' Auto classes (see the module docstring)."""
    processor = transformers.AutoProcessor.from_pretrained(str(export))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    assert type(model).__name__ == "IdeficsForVisionText2Text"
    out = []
    for image in images:
        inputs = idefics_reference(processor, processor.tokenizer, image, QUESTION)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW)  # greedy: generation_config.json
        out.append(processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _vlm_answers(folder: Path, images: list[Path]) -> list[str]:
    out = []
    for image in images:
        r = runner.invoke(app, ["generate", str(folder), "--image", str(image), "--prompt", QUESTION,
                                "--max-new-tokens", str(NEW)])
        assert r.exit_code == 0, r.output
        out.append(r.stdout.strip())
    return out


def test_idefics_round_trips_and_the_export_answers_as_vlm_generate(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    _hf_folder(hf_dir, seed=4)
    built, back = export_round_trip(hf_dir, tmp_path)
    assert {"chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json"} <= {p.name for p in back.iterdir()}
    # the config holds what the checkpoint's says (its pad id aside: the export writes the tokenizer's)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, hf_dir))
    assert not config_subset({k: v for k, v in ours.items() if k != "pad_token_id"}, theirs)
    assert (back / "chat_template.jinja").read_text() == IDEFICS_TEMPLATE  # the import's layout taken off
    # importing the export gives the spec the checkpoint gave (its folder aside)
    r = runner.invoke(app, ["import-hf", str(back), "-o", str(tmp_path / "again.vlm")])
    assert r.exit_code == 0, r.output
    first, again = ((tmp_path / n).read_text().replace(str(d), "DIR") for n, d in (("imported.vlm", hf_dir),
                                                                                ("again.vlm", back)))
    assert again == first

    images = [noise_image(tmp_path / "wide.png", (52, 30)), noise_image(tmp_path / "tall.png", (20, 45))]
    want = _vlm_answers(built, images)
    assert _transformers_answers(back, images) == want
    assert len(set(want)) == 2 and all(want)  # the two images get different answers


@pytest.mark.parametrize("kw", [
    dict(resampler=False, qk=False, alpha="vector", depth=3, interval=1, seed=1),
    dict(extra=0, qk=False, depth=6, interval=3, image_token=100, seed=5),
], ids=["vision_only_vector_gates", "base_vocab_image_token"])
def test_idefics_variants_round_trip_bit_for_bit(kw: dict, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    image = kw.get("image_token", 129)
    _hf_folder(hf_dir, fake=image - 1, image=image, **kw)
    _, back = export_round_trip(hf_dir, tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["cross_layer_interval"] == kw["interval"] and config["use_resampler"] == kw.get("resampler", True)


# ---------------------------------------------------------------- a hand-written IDEFICS spec

SPEC = """
model m {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64  act = gelu
                      feature = layer(-1).all }
  connector resampler = perceiver(clip -> llm) { latents = 4  depth = 1  heads = 2  head_dim = 16  act = relu
                                                 qk_norm = true }
  language llm = llama { width = 64  depth = 4  heads = 4  ffn = 96  vocab = 128  extra_vocab = 2
                         max_positions = 256 }
  fusion cross_attention(resampler -> llm) { every = 2  qk_norm = true  image_attention = latest }
  prompt = "<fake_token_around_image>{image}<fake_token_around_image>{q}\\nAnswer:"
  answer = " {a}"
}
"""


def _model_dir(tmp: Path, text: str) -> Path:
    """A vlmspec folder of the spec, every matrix drawn from N(0, 0.3) (the default init's 0.02 makes every
    answer alike), then norms, biases and gates as `randomise` draws them (so that the image counts)."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.model import build_model

    spec = tmp / "m.vlm"
    spec.write_text(text)
    analysis = load_analysis(str(spec))[0]
    tok = tokenizer_with(130, {128: FAKE, 129: "<image>"})
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=129).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    randomise(model, seed=1)
    return save_model_dir(model, analysis, tmp / "vlm", tokenizer=tok, spec_text=text)


def test_a_hand_written_idefics_spec_exports_its_prompt(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, SPEC)
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    images = [noise_image(tmp_path / "wide.png", (52, 30)), noise_image(tmp_path / "tall.png", (20, 45))]
    want = _vlm_answers(folder, images)
    assert _transformers_answers(tmp_path / "hf", images) == want and len(set(want)) == 2


@pytest.mark.parametrize(("edit", "named"), [
    (("image_attention = latest", "image_attention = all"), "image_attention = all"),
    (("feature = layer(-1).all", "feature = layer(-1).all  fit = crop"), "fit = crop"),
    (("heads = 4  ffn", "heads = 4  kv_heads = 2  ffn"), "kv_heads = 2"),
    (("every = 2", "every = 3"), "blocks before layers [0, 3] of 4"),
    (("max_positions = 256", "max_positions = 256  quantize = int8"), "quantize = int8"),
    (("<fake_token_around_image>{image}<fake_token_around_image>", "{image}"), "prompt = "),
])
def test_a_spec_idefics_cannot_hold_is_refused_in_one_line(edit: tuple[str, str], named: str, tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, SPEC.replace(*edit))
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = next(x for x in r.output.splitlines() if "error[E0586]" in x)
    assert named in line and "does not fit the IDEFICS layout" in line, line
    assert not (tmp_path / "hf").exists()

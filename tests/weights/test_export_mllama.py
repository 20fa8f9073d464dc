"""Llama 3.2 Vision (Mllama): `vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for
bit (GQA and MHA, cross-attention layers anywhere, several global layers and intermediate states, one
intermediate state, Llama 3.1 RoPE scaling), the export's config holds what the checkpoint's says and imports
back to the same spec, and transformers on the export (`AutoProcessor` + `AutoModelForImageTextToText`,
its chat template, image processor and generation config all written by vlmspec) answers as `vlm generate`
does on the built folder for non-square images that tile differently. What Mllama cannot hold is refused in
one line (E0586)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import config_subset, export_round_trip  # noqa: E402
from test_import_folder import char_tokenizer, runner  # noqa: E402
from test_import_folder_qwen_idefics_mllama import (  # noqa: E402
    MLLAMA_TEMPLATE,
    QUESTION,
    hf_generate,
    noise_image,
)
from test_parity_mllama import IMAGE, TILES, mllama  # noqa: E402

from vlmspec.cli import app  # noqa: E402

NEW = 12


def _hf_folder(hf_dir: Path, **kw) -> None:
    """A tiny Mllama checkpoint folder: the model (`test_parity_mllama.mllama`), a character tokenizer with
    `<|image|>` at the first extra embedding row, Llama 3.2's (shortened) chat template and an image
    processor with a non-default mean and std."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    mllama(hf_dir, bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw)
    tok = char_tokenizer(vocab=130, image="<|image|>", image_id=IMAGE)
    images = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=TILES,
                                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    transformers.MllamaProcessor(image_processor=images, tokenizer=tok,
                                 chat_template=MLLAMA_TEMPLATE).save_pretrained(str(hf_dir))


def _vlm_answers(folder: Path, images: list[Path]) -> list[str]:
    out = []
    for image in images:
        r = runner.invoke(app, ["generate", str(folder), "--image", str(image), "--prompt", QUESTION,
                                "--max-new-tokens", str(NEW)])
        assert r.exit_code == 0, r.output
        out.append(r.stdout.strip())
    return out


def _transformers_answers(export: Path, images: list[Path]) -> list[str]:
    """Greedy answers of the export through transformers' Auto classes and its chat template."""
    processor = transformers.AutoProcessor.from_pretrained(str(export))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert type(processor).__name__ == "MllamaProcessor"
    return [hf_generate(processor, model, image, QUESTION, NEW, IMAGE)[0] for image in images]


def test_mllama_round_trips_and_the_export_answers_as_vlm_generate(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    _hf_folder(hf_dir, seed=2)
    built, back = export_round_trip(hf_dir, tmp_path)
    assert {"chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json"} <= {p.name for p in back.iterdir()}
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, hf_dir))
    assert not config_subset(ours, theirs)
    assert (back / "chat_template.jinja").read_text() == MLLAMA_TEMPLATE
    # importing the export gives the spec the checkpoint gave (its folder aside)
    r = runner.invoke(app, ["import-hf", str(back), "-o", str(tmp_path / "again.vlm")])
    assert r.exit_code == 0, r.output
    first, again = ((tmp_path / n).read_text().replace(str(d), "DIR") for n, d in (("imported.vlm", hf_dir),
                                                                                ("again.vlm", back)))
    assert again == first

    images = [noise_image(tmp_path / "wide.png", (90, 40)),  # two tiles side by side, the second padded
              noise_image(tmp_path / "tall.png", (33, 129))]  # four tiles in a column
    want = _vlm_answers(built, images)
    assert _transformers_answers(back, images) == want
    assert len(set(want)) == 2 and all(want)  # the two images get different answers


@pytest.mark.parametrize("kw", [
    dict(kv_heads=4, cross=(0, 4, 7), depth=9, seed=1),
    dict(local=4, n_global=2, inter=(0, 1, 3), seed=3),
    dict(inter=(1,), seed=5),
    dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64), seed=4),
], ids=["mha_cross_from_layer_0", "two_global_three_intermediates", "one_intermediate", "llama3_rope"])
def test_mllama_variants_round_trip_bit_for_bit(kw: dict, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    _hf_folder(hf_dir, **kw)
    _, back = export_round_trip(hf_dir, tmp_path)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, hf_dir))
    assert not config_subset(ours, theirs)
    assert ours["text_config"]["cross_attention_layers"] == list(kw.get("cross", (1, 4)))


@pytest.fixture(scope="module")
def imported_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The spec `vlm import-hf` writes for a tiny Mllama folder, without its `weights` lines (so that an
    edit the checkpoint could not load still builds)."""
    tmp = tmp_path_factory.mktemp("mllama")
    _hf_folder(tmp / "hf", seed=6)
    spec = tmp / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(tmp / "hf"), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    return "\n".join(x for x in spec.read_text().splitlines() if not x.strip().startswith("weights = "))


def _model_dir(tmp: Path, text: str) -> Path:
    """A vlmspec folder of the spec (freshly initialised) with the tiny folder's tokenizer."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.model import build_model

    spec = tmp / "m.vlm"
    spec.write_text(text)
    analysis = load_analysis(str(spec))[0]
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=IMAGE).eval()
    tok = char_tokenizer(vocab=130, image="<|image|>", image_id=IMAGE)
    return save_model_dir(model, analysis, tmp / "vlm", tokenizer=tok, spec_text=text)


@pytest.mark.parametrize(("edit", "named"), [
    (('no_image = "attend_all"', 'no_image = "skip_block"'), "no_image = "),
    (("qk_norm = true", "qk_norm = false"), "qk_norm = false"),
    (("tile_padding = 8", "tile_padding = 16"), "tile_padding = 16"),
    (("feature = layers([4, 1, 3]).all", "feature = layers([3, 1, 4]).all"), "feature = layers([3, 1, 4]).all"),
    (("norm_eps = 1e-05\n    feature", "norm_eps = 1e-06\n    feature"), "norm_eps = 1e-06"),
    (("out = 64", "out = 64\n    bias = false"), "bias = false"),
    (("kv_heads = 2", "kv_heads = 2\n    head_dim = 32"), "head_dim = 32"),
    (("max_positions = 256", 'max_positions = 256\n    quantize = "int8"'), "quantize = int8"),
], ids=["skip_block", "qk_norm", "tile_padding", "feature", "vision_eps", "projector_bias", "head_dim", "quantized"])
def test_a_spec_mllama_cannot_hold_is_refused_in_one_line(imported_spec: str, edit: tuple[str, str], named: str,
                                                          tmp_path: Path) -> None:
    assert edit[0] in imported_spec
    folder = _model_dir(tmp_path, imported_spec.replace(*edit))
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if "error[E0586]" in x]
    assert len(lines) == 1 and named in lines[0] and "does not fit the Mllama layout" in lines[0], r.output
    assert not (tmp_path / "hf").exists()


def test_the_unedited_spec_exports(imported_spec: str, tmp_path: Path) -> None:
    """The refusals above are the edits' doing: the same spec unedited exports."""
    folder = _model_dir(tmp_path, imported_spec)
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output

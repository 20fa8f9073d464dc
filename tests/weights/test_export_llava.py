"""LLaVA: `vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for bit, and the
export answers through transformers' `AutoProcessor` + `AutoModelForImageTextToText` (chat template,
processor, generation config all written by vlmspec) exactly as `vlm generate` answers on the built folder."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import export_round_trip, llava, noise_image  # noqa: E402
from test_import_folder import LLAVA_TEMPLATE, QUESTION, char_tokenizer, hf_generate, runner  # noqa: E402

from vlmspec.cli import app  # noqa: E402


def test_llava_round_trips_and_the_export_answers_as_vlm_generate(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    llava(transformers, hf_dir, seed=3)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                resample=3)
    transformers.LlavaProcessor(image_processor=images, tokenizer=char_tokenizer(), patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=LLAVA_TEMPLATE).save_pretrained(str(hf_dir))
    built, back = export_round_trip(hf_dir, tmp_path)
    assert {"chat_template.jinja", "generation_config.json", "preprocessor_config.json"} <= {
        p.name for p in back.iterdir()}

    processor = transformers.AutoProcessor.from_pretrained(str(back))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    for name, size in (("wide.png", (52, 30)), ("tall.png", (21, 47))):
        image = tmp_path / name
        noise_image(image, size)
        r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                                "--max-new-tokens", "12"])
        assert r.exit_code == 0, r.output
        want, _ = hf_generate(processor, model, image, QUESTION, 12)
        assert r.stdout.strip() == want and want

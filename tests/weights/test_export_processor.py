"""`vlm export-hf` writes a folder that transformers' own LLaVA stack runs end to end: the processor
(tokenizer + image processor) turns a prompt and an image into the inputs our processor makes, and
the model gives our logits."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from hf_tiny import loaded, noise_image  # noqa: E402
from PIL import Image  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.runtime.checkpoint import save_model_dir  # noqa: E402
from vlmspec.runtime.inputs.tokenizer import train_tokenizer  # noqa: E402
from vlmspec.runtime.model import build_model  # noqa: E402
from vlmspec.runtime.weights.export import export_hf  # noqa: E402

SPEC = """
model m {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64
                      feature = layer(-2).patches  resize = bilinear }
  connector proj = mlp(clip -> llm) { layers = 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }
  fusion prefix(proj -> llm)
  prompt = "USER: {image}\\n{q} ASSISTANT:"
}
"""


def _corpus() -> list[str]:
    return [f"USER: what colour is the {s}? ASSISTANT: {c}" for s in ("circle", "square", "cross")
            for c in ("red", "green", "blue")] * 4


def test_exported_folder_runs_with_the_transformers_processor(tmp_path: Path) -> None:
    spec = tmp_path / "m.vlm"
    spec.write_text(SPEC)
    analysis = load_analysis(str(spec))[0]
    tok = train_tokenizer(_corpus(), 300)
    torch.manual_seed(0)
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    save_model_dir(model, analysis, tmp_path / "vlm", tokenizer=tok, spec_text=SPEC)
    out = export_hf(tmp_path / "vlm", tmp_path / "hf")
    assert not (tmp_path / ".hf.tmp").exists()

    ours, processor = loaded(tmp_path / "vlm")
    image = Image.open(noise_image(tmp_path / "noise.png", (40, 28), sigma=60))
    question = "what colour is the circle?"
    ids = torch.tensor([processor.encode_prompt(question)])
    px = processor.transform(image)[None]

    processor = transformers.LlavaProcessor.from_pretrained(str(out))
    text = "USER: <image>\n" + question + " ASSISTANT:"
    inputs = processor(images=image, text=text, return_tensors="pt")
    hf_ids = inputs["input_ids"]
    if hf_ids[0, 0] != ids[0, 0]:  # the tokenizer may or may not add bos itself
        hf_ids = torch.cat([ids[:, :1], hf_ids], dim=1)
    assert hf_ids.tolist() == ids.tolist()  # 16 image tokens expanded by the processor, same text ids
    assert (inputs["pixel_values"] - px).abs().max() <= 1e-4

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        a = ours(ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
        b = hf(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=inputs["pixel_values"]).logits
    assert (a - b).abs().max() <= 1e-4

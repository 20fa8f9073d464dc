"""Qwen2-VL: `vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for bit (untied and
tied), and transformers on the export answers as `vlm generate` does on the built folder for non-square images
of their own sizes. A hand-written Qwen2-VL spec (its chat template written from `prompt` / `answer`) exports,
and transformers reads the export as vlmspec does: the same ids and pixels from a non-square image, the same
logits. A spec Qwen2-VL cannot hold is refused in one E0586 line.

transformers is driven with `AutoModelForImageTextToText` (which maps `qwen2_vl` to
`Qwen2VLForConditionalGeneration`), the export's `AutoImageProcessor` (Qwen2VLImageProcessor), its tokenizer
and its chat template; the reference expands `<|image_pad|>` per image as `Qwen2VLProcessor` does
(`qwen_reference`), and a test checks it against that processor built from the export without its video half
(which needs torchvision)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, export_round_trip, loaded, randomise  # noqa: E402
from test_import_folder import runner  # noqa: E402
from test_import_folder_qwen_idefics_mllama import (  # noqa: E402
    QUESTION,
    QWEN_TEMPLATE,
    noise_image,
    qwen_reference,
    tokenizer_with,
)
from test_parity_qwen2_vl import END, IMG, MERGE, PATCH, START, TEMPORAL, hf_pixels, qwen2_vl  # noqa: E402

from vlmspec.cli import app  # noqa: E402

NEW = 12


def qwen_tokenizer():
    """Single characters with Qwen's special tokens at the fixture's ids, no BOS, eos `<|im_end|>`."""
    return tokenizer_with(127, {IMG: "<|image_pad|>", 101: "<|video_pad|>", START: "<|vision_start|>",
                                END: "<|vision_end|>", 104: "<|im_start|>", 105: "<|im_end|>"}, bos=None,
                          eos="<|im_end|>")


def hf_reader(back: Path):
    """(image processor, tokenizer, model) as transformers loads them from the export."""
    images = transformers.AutoImageProcessor.from_pretrained(str(back))
    tok = transformers.AutoTokenizer.from_pretrained(str(back))
    assert tok.chat_template == (back / "chat_template.jinja").read_text()
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    return images, tok, model


def checkpoint(hf_dir: Path, *, tie: bool = False, kv_heads: int = 2, seed: int = 2) -> None:
    """The tiny Qwen2-VL folder the import test makes: model, tokenizer with Qwen's special tokens and chat
    template, a Qwen2VLImageProcessor with a pixel range, a bilinear filter and its own mean / std, eos
    `<|im_end|>`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    qwen2_vl(hf_dir, seed=seed, tie=tie, kv_heads=kv_heads)
    tok = qwen_tokenizer()
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(hf_dir))
    (hf_dir / "preprocessor_config.json").unlink()
    Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=PATCH, merge_size=MERGE,
                             temporal_patch_size=TEMPORAL, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4],
                             resample=2).save_pretrained(str(hf_dir))
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    (hf_dir / "generation_config.json").write_text(json.dumps({**gen, "bos_token_id": None, "eos_token_id": 105,
                                                               "pad_token_id": 3}))


def test_qwen2_vl_round_trips_and_the_export_answers_as_vlm_generate(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    checkpoint(hf_dir)
    built, back = export_round_trip(hf_dir, tmp_path)
    assert {"chat_template.jinja", "generation_config.json", "preprocessor_config.json",
            "processor_config.json"} <= {p.name for p in back.iterdir()}
    config = json.loads((back / "config.json").read_text())
    assert (config["image_token_id"], config["video_token_id"], config["vision_start_token_id"],
            config["vision_end_token_id"]) == (IMG, 101, START, END)

    images, tok, model = hf_reader(back)
    assert (images.size["shortest_edge"], images.size["longest_edge"]) == (32 * 32, 64 * 64)
    answers = []
    for name, size in (("wide.png", (90, 40)), ("tall.png", (30, 52))):  # 32 x 96 and 48 x 32 after resizing
        image = noise_image(tmp_path / name, size)
        r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                                "--max-new-tokens", str(NEW)])
        assert r.exit_code == 0, r.output
        inputs = qwen_reference(images, tok, image, QUESTION, MERGE)
        with torch.no_grad():  # eos and the banned placeholder come from the export's generation_config.json
            out = model.generate(**inputs, max_new_tokens=NEW)
        new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert IMG not in new_ids
        want = tok.decode(new_ids, skip_special_tokens=True).strip()
        assert r.stdout.strip() == want and want
        answers.append(want)
    assert len(set(answers)) == 2  # the two images get different answers


def test_qwen2_vl_processor_on_the_export_lays_prompts_out_as_the_reference(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`Qwen2VLProcessor` itself, built from the export's image processor, tokenizer and chat template (its
    absent video half allowed: transformers without torchvision has no class to check it against), gives the
    ids and pixels `qwen_reference` gives (the reference the other tests compare `vlm generate` with)."""
    from transformers import processing_utils

    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", object, raising=False)
    hf_dir = tmp_path / "hf"
    checkpoint(hf_dir)
    _, back = export_round_trip(hf_dir, tmp_path)
    images, tok, _ = hf_reader(back)
    processor = transformers.Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=None,
                                              chat_template=(back / "chat_template.jinja").read_text())
    for name, size in (("wide.png", (90, 40)), ("tall.png", (30, 52))):
        image = noise_image(tmp_path / name, size)
        conversation = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                     {"type": "text", "text": QUESTION}]}]
        theirs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ref = qwen_reference(images, tok, image, QUESTION, MERGE)
        assert torch.equal(theirs["input_ids"], ref["input_ids"])
        assert torch.equal(theirs["pixel_values"], ref["pixel_values"])
        assert torch.equal(theirs["image_grid_thw"], ref["image_grid_thw"])


def test_tied_qwen2_vl_round_trips(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    checkpoint(hf_dir, tie=True, kv_heads=4, seed=5)
    _, back = export_round_trip(hf_dir, tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["text_config"]["num_key_value_heads"] == 4


# ---------------------------------------------------------------- a hand-written spec; refusals

#: a hand-written tiny Qwen2-VL, prompted as Qwen2-VL-Instruct is (no `chat_template`: the export writes one
#: from `prompt` and `answer`)
SPEC = """model tiny_qwen2_vl {
  vision vit = vit {
    image_size = 64  patch_size = 8  temporal_patch = 2  width = 32  depth = 2  heads = 2  mlp = 64
    norm_eps = 1e-6  position = rope2d  class_token = false  pre_norm = false  post_norm = false
    resolution = dynamic(min_pixels = 1024, max_pixels = 4096)  feature = layer(-1).patches
  }
  connector merger = patch_merger(vit -> llm) { merge = 2  layers = 2  act = gelu }
  language llm = llama {
    width = 64  depth = 2  heads = 4  kv_heads = 2  qkv_bias = true  ffn = 128  vocab = 128  max_positions = 256
    rope = mrope(sections = [2, 3, 3])
  }
  fusion prefix(merger -> llm) { image_token = "<|image_pad|>" }
  prompt = "<|im_start|>user\\n<|vision_start|>{image}<|vision_end|>{q}<|im_end|>\\n<|im_start|>assistant\\n"
  answer = "{a}<|im_end|>"
}
"""


def model_dir(tmp: Path, text: str) -> Path:
    """A model folder of a spec, its parameters drawn at random (`randomise`), with the Qwen tokenizer."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.model import build_model

    spec = tmp / "m.vlm"
    spec.write_text(text)
    analysis = load_analysis(str(spec))[0]
    model = build_model(analysis, image_token_id=IMG)
    randomise(model, seed=7)
    return save_model_dir(model, analysis, tmp / "built", tokenizer=qwen_tokenizer(), spec_text=text)


def test_a_hand_written_qwen2_vl_spec_exports_and_transformers_reads_it_as_vlmspec(tmp_path: Path) -> None:
    from vlmspec.runtime.weights.export import export_hf

    built = model_dir(tmp_path, SPEC)
    back = export_hf(built, tmp_path / "hf")
    images, tok, model = hf_reader(back)
    assert model.config.vision_config.mlp_ratio == 2
    image = noise_image(tmp_path / "wide.png", (70, 33))  # -> 32 x 64: 2 x 4 tokens
    inputs = qwen_reference(images, tok, image, QUESTION, MERGE)
    ours, proc = loaded(built)
    batch = proc.generation_batch([QUESTION], [image])
    assert batch["input_ids"][0].tolist() == inputs["input_ids"][0].tolist()
    pixels, grid = hf_pixels(batch["pixel_values"])
    assert torch.equal(grid, inputs["image_grid_thw"]) and grid[0].tolist() == [1, 4, 8]
    assert (pixels - inputs["pixel_values"]).abs().max() <= 1e-5
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")}
    assert_sees_image(lambda p: model(pixel_values=hf_pixels(p)[0], **kw).logits, batch["pixel_values"])
    with torch.no_grad():
        want = model(**inputs).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    assert float((want - got).abs().max()) <= 1e-4


@pytest.mark.parametrize(("edit", "named"), [
    (("act = gelu }", "act = gelu_tanh }"), "connector `merger` with layers = 2, act = gelu_tanh"),
    (("act = gelu }", "act = gelu  norm = rms }"), "connector `merger` with norm = rms"),
    (("image_size = 64", "image_size = 48"), "vision `vit` with image_size = 48"),
    (("norm_eps = 1e-6", "norm_eps = 1e-5"), "vision `vit` with norm_eps = 1e-05"),
    (("qkv_bias = true", "qkv_bias = false"), "language model `llm` without qkv_bias"),
    (("max_positions = 256", "max_positions = 256  quantize = int8"), "`llm` with quantize = int8"),
    (('image_token = "<|image_pad|>" }', 'image_token = "<|image_pad|>"  prefix_attention = bidirectional }'),
     "fusion `prefix` with prefix_attention = bidirectional"),
])
def test_a_spec_qwen2_vl_cannot_hold_is_refused_in_one_line(edit: tuple[str, str], named: str,
                                                            tmp_path: Path) -> None:
    assert edit[0] in SPEC
    folder = model_dir(tmp_path, SPEC.replace(*edit))
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if "error[E0586]" in x]
    assert len(lines) == 1 and named in lines[0] and "does not fit the Qwen2-VL layout" in lines[0], r.output
    assert not (tmp_path / "hf").exists()

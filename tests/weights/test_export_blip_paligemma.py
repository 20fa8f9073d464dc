"""BLIP-2, InstructBLIP and PaliGemma: `vlm import-hf -> build -> export-hf` gives the checkpoint's tensors
back bit for bit, and the export answers through transformers' `AutoProcessor` +
`AutoModelForImageTextToText` (processor configs, InstructBLIP's `qformer_tokenizer/`, chat template all
written by vlmspec) exactly as `vlm generate` answers on the built folder, for images of other sizes and
aspect ratios than the model's. A spec these formats cannot hold is refused in one E0586 line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import export_round_trip, loaded  # noqa: E402
from PIL import Image  # noqa: E402
from test_import_folder import char_tokenizer, runner  # noqa: E402
from test_import_folder_blip_paligemma import (  # noqa: E402
    NEW,
    QUESTION,
    SEEDS,
    blip,
    blip_processor,
    hf_answers,
    images,
    paligemma,
)

from vlmspec.cli import app  # noqa: E402

HF_CLASS = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration",
            "paligemma": "PaliGemmaForConditionalGeneration"}


def checkpoint(kind: str, hf_dir: Path) -> None:
    """The tiny checkpoint folder of `kind` (model, tokenizer, processor), as the import tests make it."""
    if kind == "paligemma":
        paligemma(hf_dir, seed=SEEDS[kind])
        pixels = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2)
        pixels.image_seq_length = 16
        transformers.PaliGemmaProcessor(image_processor=pixels, tokenizer=char_tokenizer()).save_pretrained(str(hf_dir))
    else:
        blip(kind, hf_dir, seed=SEEDS[kind])
        blip_processor(kind, hf_dir).save_pretrained(str(hf_dir))


def vlm_generate(built: Path, image: Path) -> str:
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    return r.stdout.strip()


def check_chat_template(processor, ours, image: Path) -> None:
    """The exported chat template lays a conversation out as vlmspec's `Processor` does, through the
    processor (which adds the image placeholders, BOS and PaliGemma's newline itself): one question, and a
    second one after an answer. Blip2Processor / InstructBlipProcessor (transformers 5) drop the
    `chat_template` they are loaded with, so the template is read from the tokenizer, which loads it too;
    PaliGemma's processor applies it itself."""
    pixels = Image.open(image).convert("RGB")
    first = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": QUESTION}]}]
    later = [*first, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]
    for conversation, want in ((first, ours.encode_prompt(QUESTION)),
                               (later, ours.encode_chat([(QUESTION, "A cat.")], "And the colour?"))):
        text = processor.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert processor(images=pixels, text=text, return_tensors="pt")["input_ids"][0].tolist() == want, text
    if processor.chat_template is not None:
        chat = processor.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")
        assert chat["input_ids"][0].tolist() == ours.encode_prompt(QUESTION)


@pytest.mark.parametrize("kind", ["blip-2", "instructblip", "paligemma"])
def test_export_round_trips_and_answers_as_vlm_generate(tmp_path: Path, kind: str) -> None:
    hf_dir = tmp_path / "hf"
    checkpoint(kind, hf_dir)
    built, back = export_round_trip(hf_dir, tmp_path)
    assert json.loads((back / "config.json").read_text())["model_type"] == kind
    assert (back / "qformer_tokenizer").is_dir() == (kind == "instructblip")

    # transformers 5 maps all three to AutoModelForImageTextToText
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    assert type(model).__name__ == HF_CLASS[kind]
    processor = transformers.AutoProcessor.from_pretrained(str(back))
    _, ours = loaded(built)
    paths = images(tmp_path)
    want, _ = hf_answers(back, model, paths)  # processor(images=..., text=QUESTION) + greedy generate
    assert [vlm_generate(built, p) for p in paths] == want and want[0] != want[1] and all(want)
    for path in paths:
        inputs = processor(images=Image.open(path).convert("RGB"), text=QUESTION, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours.encode_prompt(QUESTION)
        assert (ours.transform(path)[None] - inputs["pixel_values"]).abs().max() <= 1e-5
        if kind == "instructblip":
            assert torch.equal(ours.instruction([QUESTION]).ids, inputs["qformer_input_ids"])
        check_chat_template(processor, ours, path)


BLIP_SPEC = """
model m {
  vision eva = eva { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64
                     feature = layer(-1).all }
  connector qf = qformer(eva -> llm) { queries = 4  width = 32  depth = 1  heads = 2  mlp = 64  text_ffn = false }
  language llm = opt { width = 32  depth = 1  heads = 2  ffn = 64  vocab = 128  max_positions = 64 }
  fusion prefix(qf -> llm)
  prompt = "{image}<s>{q}"
}
"""
PALIGEMMA_SPEC = """
model m {
  vision siglip = siglip { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }
  connector proj = linear(siglip -> llm)
  language llm = gemma { width = 32  depth = 1  heads = 2  head_dim = 16  ffn = 64  vocab = 128  max_positions = 64 }
  fusion prefix(proj -> llm) { prefix_attention = bidirectional }
  prompt = "{image}<s>{q}\\n"
}
"""


def model_dir(tmp: Path, text: str) -> Path:
    """A freshly initialised model folder of a spec, with the tiny character tokenizer (quantization, as
    any setting, is applied when the folder is loaded)."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.checkpoint import save_model_dir
    from vlmspec.runtime.model import build_model

    spec = tmp / "m.vlm"
    spec.write_text(text)
    analysis = load_analysis(str(spec))[0]
    tok = char_tokenizer()
    model = build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>"))
    return save_model_dir(model, analysis, tmp / "built", tokenizer=tok, spec_text=text)


@pytest.mark.parametrize(("spec", "edits", "fmt", "named"), [
    (BLIP_SPEC, [("eva = eva {", "eva = vit {")], "BLIP-2", "vision `eva` (vit)"),
    (BLIP_SPEC, [("max_positions = 64 }", "max_positions = 64  quantize = int8 }")], "BLIP-2",
     "language `llm` with quantize = int8"),
    # the processor puts the image placeholders before any text
    (BLIP_SPEC, [('prompt = "', 'system = "Be brief."  prompt = "')], "BLIP-2", "`system`"),
    # the processor gives the Q-Former the text the language model reads, not the question alone
    (BLIP_SPEC, [("text_ffn = false }", "instruction = true }"), ("<s>{q}", "<s>Question: {q}")], "InstructBLIP",
     'prompt = "{image}<s>Question: {q}"'),
    (PALIGEMMA_SPEC, [(" { prefix_attention = bidirectional }", "")], "PaliGemma",
     "fusion `prefix` with prefix_attention = causal"),
    (PALIGEMMA_SPEC, [("llm = gemma {", "llm = llama {")], "PaliGemma", "language model `llm` (llama)"),
])
def test_a_spec_the_format_cannot_hold_is_refused_in_one_line(tmp_path: Path, spec: str,
                                                              edits: list[tuple[str, str]], fmt: str,
                                                              named: str) -> None:
    for old, new in edits:
        assert old in spec
        spec = spec.replace(old, new)
    folder = model_dir(tmp_path, spec)
    r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if "error[E0586]" in x]
    assert len(lines) == 1 and named in lines[0] and f"does not fit the {fmt} layout" in lines[0], r.output
    assert not (tmp_path / "hf").exists()

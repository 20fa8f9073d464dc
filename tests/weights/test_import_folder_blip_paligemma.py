"""`vlm import-hf -> build -> generate` on tiny BLIP-2, InstructBLIP and PaliGemma folders (model, tokenizer,
processor; InstructBLIP's `qformer_tokenizer/`) answers exactly as transformers' processor + greedy
`generate` do on the same folder, for images of other sizes and aspect ratios than the model's.

None of the three has a chat template: their processors lay the prompt out. BLIP-2 / InstructBLIP put one
image placeholder per query before the tokenized text (its BOS after the images); PaliGemma puts the
placeholders, BOS, the text and a newline, the prompt attending bidirectionally (`token_type_ids`)."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import IMAGE_TOKEN, NQ, assert_sees_image, blip_configs, loaded, randomise  # noqa: E402
from PIL import Image  # noqa: E402
from test_import_folder import char_tokenizer, cli_generate  # noqa: E402

QUESTION = "What is in the picture?"
NEW = 12
#: seeds whose tiny models answer in varied characters, differently for the two images
SEEDS = {"blip-2": 0, "instructblip": 2, "paligemma": 4}


def images(tmp: Path) -> list[Path]:
    """A wide and a tall noise image, neither square nor the model's 32 x 32."""
    out, rng = [], np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (52, 30)), ("tall.png", (21, 47))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / name)
        out.append(tmp / name)
    return out


def bert_tokenizer(folder: Path):
    """A tiny lower-case WordPiece (BERT) tokenizer of single characters: the Q-Former's own vocabulary."""
    chars = string.ascii_lowercase + string.digits + "?.,!"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def blip(kind: str, out: Path, seed: int):
    """A tiny BLIP-2 or InstructBLIP; the OPT head untied (tied, greedy decoding repeats one character)."""
    transformers.utils.logging.set_verbosity_error()
    configs = blip_configs()
    configs["text_config"] = {**configs["text_config"], "tie_word_embeddings": False}
    name = "Blip2" if kind == "blip-2" else "InstructBlip"
    cfg = getattr(transformers, f"{name}Config")(**configs, tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


def paligemma(out: Path, seed: int):
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           vision_use_head=False),
        # 128 ids and the 1152 <locNNNN> / <segNNN> tokens PaliGemma's processor adds, as the real vocabulary has
        text_config=dict(model_type="gemma", vocab_size=1280, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False),
        image_token_id=IMAGE_TOKEN, projection_dim=48, tie_word_embeddings=False)  # tied, it repeats the prompt's "\n"
    torch.manual_seed(seed)
    m = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    with torch.no_grad():  # the head's rows of the added tokens small: the answers are made of characters
        m.get_output_embeddings().weight[128:] *= 0.01
    m.save_pretrained(str(out))
    return m


def blip_processor(kind: str, hf_dir: Path):
    tok = char_tokenizer()
    pixels = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    if kind == "instructblip":
        qf = bert_tokenizer(hf_dir.parent / "bert")
        return transformers.InstructBlipProcessor(image_processor=pixels, tokenizer=tok, qformer_tokenizer=qf,
                                                  num_query_tokens=NQ)
    return transformers.Blip2Processor(image_processor=pixels, tokenizer=tok, num_query_tokens=NQ)


def hf_answers(hf_dir: Path, model, paths: list[Path]) -> tuple[list[str], dict]:
    """transformers' processor (loaded back from the folder) + greedy `generate`, one image at a time:
    (the answers, the first image's inputs)."""
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    answers, first = [], None
    for path in paths:
        inputs = processor(images=Image.open(path).convert("RGB"), text=QUESTION, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        assert IMAGE_TOKEN not in new.tolist()  # vlmspec never emits the image placeholder
        answers.append(processor.decode(new, skip_special_tokens=True).strip())
        first = first or inputs
    return answers, first


def check_inputs(tmp: Path, inputs: dict, image: Path) -> None:
    """The built folder's processor gives transformers' ids and pixels."""
    _, ours = loaded(tmp / "built")
    assert ours.encode_prompt(QUESTION) == inputs["input_ids"][0].tolist()
    assert (ours.transform(image)[None] - inputs["pixel_values"]).abs().max() <= 1e-5
    if "qformer_input_ids" in inputs:
        instruction = ours.instruction([QUESTION])
        assert torch.equal(instruction.ids, inputs["qformer_input_ids"])


@pytest.mark.parametrize("kind", ["blip-2", "instructblip"])
def test_blip_folder_generates_as_transformers(tmp_path: Path, kind: str) -> None:
    hf_dir = tmp_path / "hf"
    hf = blip(kind, hf_dir, seed=SEEDS[kind])
    blip_processor(kind, hf_dir).save_pretrained(str(hf_dir))
    if kind == "instructblip":
        assert (hf_dir / "qformer_tokenizer").is_dir()
    paths = images(tmp_path)

    ours, spec = cli_generate(hf_dir, tmp_path, paths[0], QUESTION, NEW)
    assert 'prompt = "{image}<s>{q}"' in spec and "chat_template" not in spec
    want, inputs = hf_answers(hf_dir, hf, paths)
    assert ours == want[0] and want[0] != want[1]
    check_inputs(tmp_path, inputs, paths[0])
    extra = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    assert_sees_image(lambda p: hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=p, **extra).logits, inputs["pixel_values"])
    assert cli_generate(hf_dir, tmp_path, paths[1], QUESTION, NEW)[0] == want[1]


def test_paligemma_folder_generates_as_transformers(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf = paligemma(hf_dir, seed=SEEDS["paligemma"])
    pixels = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2)
    pixels.image_seq_length = 16
    transformers.PaliGemmaProcessor(image_processor=pixels, tokenizer=char_tokenizer()).save_pretrained(str(hf_dir))
    paths = images(tmp_path)

    ours, spec = cli_generate(hf_dir, tmp_path, paths[0], QUESTION, NEW)
    assert 'prompt = "{image}<s>{q}\\n"' in spec and 'answer = "{a}"' in spec and 'resize = "bilinear"' in spec
    want, inputs = hf_answers(hf_dir, hf, paths)
    assert ours == want[0] and want[0] != want[1]
    assert inputs["input_ids"][0].tolist()[:18] == [IMAGE_TOKEN] * 16 + [1, char_tokenizer().convert_tokens_to_ids("W")]
    check_inputs(tmp_path, inputs, paths[0])
    tti = inputs["token_type_ids"]
    assert_sees_image(lambda p: hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=p, token_type_ids=tti).logits, inputs["pixel_values"])
    assert cli_generate(hf_dir, tmp_path, paths[1], QUESTION, NEW)[0] == want[1]


@pytest.mark.parametrize("config, processor, message", [
    ({"model_type": "blip-2", "num_query_tokens": 4}, {"num_query_tokens": 8}, "num_query_tokens 8"),
    ({"model_type": "paligemma", "vision_config": {"image_size": 32, "patch_size": 8}},
     {"image_processor": {"image_seq_length": 9}}, "image_seq_length 9"),
])
def test_a_processor_layout_the_model_cannot_read_is_refused(tmp_path: Path, config, processor, message) -> None:
    import json

    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.weights.hf_folder import processor_prompt

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(UserInputError) as e:
        processor_prompt(tmp_path, char_tokenizer())
    diag = e.value.diagnostics[0]
    assert diag.code == "E0585" and message in diag.message


def test_blip_needs_a_tokenizer_that_adds_its_bos(tmp_path: Path) -> None:
    import json

    from tokenizers import processors

    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.weights.hf_folder import image_fields, processor_prompt

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "instructblip", "num_query_tokens": 4}))
    tok = char_tokenizer()
    assert processor_prompt(tmp_path, tok)[:2] == ("{image}<s>{q}", None)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    with pytest.raises(UserInputError, match="BOS"):
        processor_prompt(tmp_path, tok)
    # BlipImageProcessor's settings: a non-square size or no normalisation cannot be expressed
    for pre in ({"size": {"height": 32, "width": 48}}, {"size": {"height": 32, "width": 32}, "do_normalize": False}):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
        with pytest.raises(UserInputError) as e:
            image_fields(tmp_path, 32)
        assert e.value.diagnostics[0].code == "E0585"

"""`vlm import-hf` -> `vlm build` -> `vlm generate` on whole tiny folders (model + tokenizer + processor + chat
template + generation config) of Llama 3.2 Vision (Mllama), IDEFICS and Qwen2-VL answers token for token as
transformers' processor + chat template + greedy `generate` do on the same folder, for a non-square image
of another size than the model's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402
from hf_tiny import assert_sees_image, loaded  # noqa: E402
from PIL import Image  # noqa: E402
from test_import_folder import char_tokenizer, cli_generate_each  # noqa: E402

QUESTION = "What is in the picture?"


def tokenizer_with(vocab: int, specials: dict[int, str], bos: str | None = "<s>", eos: str = "</s>"):
    """`char_tokenizer`'s single characters (ids 0-3: <unk> <s> </s> <pad>, BOS added in front unless `bos`
    is None) with these special tokens at these ids; `vocab` ids in all, the rest `<xN>`."""
    import string

    from tokenizers import Tokenizer, decoders, models, processors

    table = ["<unk>", "<s>", "</s>", "<pad>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    table += [f"<x{i}>" for i in range(len(table), vocab)]
    for i, t in specials.items():
        table[i] = t
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, table.index(bos))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                                unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": list(specials.values())})
    assert all(fast.convert_tokens_to_ids(t) == i for i, t in specials.items())
    return fast


def noise_image(path: Path, size: tuple[int, int]) -> Path:
    return hf_tiny.noise_image(path, size)


def cli_generate(hf_dir: Path, tmp: Path, images: list[Path], question: str, new: int) -> tuple[list[str], str]:
    """`vlm import-hf` -> `vlm build` -> `vlm generate` (one answer per image, batched): (answers, spec text)."""
    out, spec = cli_generate_each(hf_dir, tmp, images, question, new)
    return out.split("\n"), spec


def hf_generate(processor, model, image: Path, question: str, new: int, image_id: int, **extra) -> tuple[str, dict]:
    """transformers' processor + chat template + greedy `generate`: (the answer, the inputs)."""
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **extra, max_new_tokens=new, do_sample=False)
    new_ids = out[0, inputs["input_ids"].shape[1]:]
    assert image_id not in new_ids.tolist()  # vlmspec never emits the image placeholder; transformers may
    return processor.decode(new_ids, skip_special_tokens=True).strip(), inputs


# ---------------------------------------------------------------- Llama 3.2 Vision (Mllama)

#: Llama 3.2 Vision's chat template, shortened (no tools, no date): headers, `<|image|>` before the text
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
    "\n\n{% endif %}")


def test_mllama_folder_generates_as_transformers(tmp_path: Path) -> None:
    from test_parity_mllama import IMAGE, TILES, mllama
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    hf_dir = tmp_path / "hf"
    hf = mllama(hf_dir, seed=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tok = char_tokenizer(vocab=130, image="<|image|>", image_id=IMAGE)
    images = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=TILES,
                                     image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    proc = transformers.MllamaProcessor(image_processor=images, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)
    proc.save_pretrained(str(hf_dir))
    wide = noise_image(tmp_path / "wide.png", (90, 40))  # two tiles side by side, the second padded
    tall = noise_image(tmp_path / "tall.png", (33, 129))  # four tiles in a column

    ours, spec = cli_generate(hf_dir, tmp_path, [wide, tall], QUESTION, 12)
    assert "mean = [0.5, 0.4, 0.3]" in spec and 'resize = "bilinear"' in spec
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.MllamaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    _, ours_proc = loaded(tmp_path / "built")
    for image, answer in zip([wide, tall], ours, strict=True):
        want, inputs = hf_generate(processor, model, image, QUESTION, 12, IMAGE)
        assert answer == want
        assert ours_proc.encode_prompt(QUESTION) == inputs["input_ids"][0].tolist()
        tiles = ours_proc.transform(image)
        assert tiles.aspect_ratio_id == int(inputs["aspect_ratio_ids"][0, 0])
        assert (tiles.pixels - inputs["pixel_values"][0, 0]).abs().max() <= 1e-5
    assert len(set(ours)) == 2  # the two images get different answers
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask",
                                 "cross_attention_mask")}
    assert_sees_image(lambda p: hf(pixel_values=p, **kw).logits, inputs["pixel_values"])


# ---------------------------------------------------------------- IDEFICS

#: an instruct-style template (IDEFICS' folders carry none): `User:`, the images, the text, `Assistant:`
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% else %}Assistant: {{ m['content'][0]['text'] }}"
    "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def idefics_reference(processor, tok, image: Path, question: str):
    """What transformers does with the folder: the chat template rendered, split at `<image>`, the pieces
    and the image handed to IdeficsProcessor in order (its `apply_chat_template` would leave `<image>` in
    the text and append the image after it)."""
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    before, after = text.split("<image>")
    return processor(text=[[before, Image.open(image), after]], return_tensors="pt")


def test_idefics_folder_generates_as_transformers(tmp_path: Path) -> None:
    from test_parity_idefics import idefics
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    hf_dir = tmp_path / "hf"
    hf = idefics(hf_dir, seed=4)
    fake, image_id = 128, 129  # the two extra rows
    tok = tokenizer_with(130, {fake: "<fake_token_around_image>", image_id: "<image>"})
    tok.chat_template = IDEFICS_TEMPLATE
    images = IdeficsImageProcessorPil(image_size=32, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    proc = transformers.IdeficsProcessor(image_processor=images, tokenizer=tok)
    proc.save_pretrained(str(hf_dir))
    wide = noise_image(tmp_path / "wide.png", (52, 30))
    tall = noise_image(tmp_path / "tall.png", (20, 45))

    ours, spec = cli_generate(hf_dir, tmp_path, [wide, tall], QUESTION, 12)
    assert "mean = [0.5, 0.4, 0.3]" in spec and "<fake_token_around_image>" in spec
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.IdeficsForVisionText2Text.from_pretrained(str(hf_dir)).eval()
    _, ours_proc = loaded(tmp_path / "built")
    for image, answer in zip([wide, tall], ours, strict=True):
        inputs = idefics_reference(processor, processor.tokenizer, image, QUESTION)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        want = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer == want
        assert ours_proc.encode_prompt(QUESTION) == inputs["input_ids"][0].tolist()
        assert (ours_proc.transform(image) - inputs["pixel_values"][0, 0]).abs().max() <= 1e-5
    assert len(set(ours)) == 2
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_attention_mask")}
    assert_sees_image(lambda p: hf(pixel_values=p, **kw).logits, inputs["pixel_values"])

    # text only: no `<fake_token_around_image>` without an image
    assert fake not in ours_proc.encode_prompt(QUESTION, 0)


# ---------------------------------------------------------------- Qwen2-VL

#: Qwen2-VL-Instruct's chat template, shortened (no video, no system default)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_reference(images, tok, image: Path, question: str, merge: int):
    """What Qwen2VLProcessor does (it cannot be built here: its video processor needs torchvision): the
    chat template rendered, `<|image_pad|>` repeated once per merged patch of the image as
    Qwen2VLImageProcessor resizes it, tokenized."""
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    px = images(images=[Image.open(image)], return_tensors="pt")
    n = int(px["image_grid_thw"][0].prod()) // merge**2
    enc = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    return {**enc, **px, "mm_token_type_ids": (enc["input_ids"] == 100).int()}


def qwen_folder(hf_dir: Path, max_pixels: int = 64 * 64):
    """Complete a Qwen2-VL / Qwen2.5-VL checkpoint folder saved by the test: a character tokenizer with
    Qwen's special tokens and chat template (no BOS, `<|im_end|>` its eos), `Qwen2VLImageProcessor`
    between 32 x 32 and `max_pixels` (mean / std of its own), and a generation config that stops at
    `<|im_end|>`. Returns (tokenizer, image processor)."""
    import json

    from test_parity_qwen2_vl import END, IMG, MERGE, PATCH, START, TEMPORAL
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer_with(127, {IMG: "<|image_pad|>", 101: "<|video_pad|>", START: "<|vision_start|>",
                               END: "<|vision_end|>", 104: "<|im_start|>", 105: "<|im_end|>"}, bos=None,
                         eos="<|im_end|>")
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(hf_dir))
    images = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=max_pixels, patch_size=PATCH, merge_size=MERGE,
                                      temporal_patch_size=TEMPORAL, image_mean=[0.5, 0.4, 0.3],
                                      image_std=[0.2, 0.3, 0.4])
    (hf_dir / "preprocessor_config.json").unlink(missing_ok=True)
    images.save_pretrained(str(hf_dir))
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    (hf_dir / "generation_config.json").write_text(json.dumps({**gen, "bos_token_id": None, "eos_token_id": 105,
                                                               "pad_token_id": 3}))
    return tok, images


def qwen_cli_matches(hf_dir: Path, tmp: Path, model, tok, images, paths: list[Path], hf_pixels):
    """For each image: `vlm import-hf -> build -> generate` equals transformers' greedy text on the folder,
    with the same ids, grid and pixels (within 1e-5); the images get different answers. Returns (the
    imported spec, the last image's transformers inputs, the last image's vlmspec batch)."""
    from test_parity_qwen2_vl import IMG, MERGE

    answers = []
    for image in paths:
        ours, spec = cli_generate(hf_dir, tmp / image.stem, [image], QUESTION, 12)
        inputs = qwen_reference(images, tok, image, QUESTION, MERGE)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, suppress_tokens=[IMG])
        want = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert ours == [want]
        answers.append(want)
        _, ours_proc = loaded(tmp / image.stem / "built")
        batch = ours_proc.generation_batch([QUESTION], [image])
        assert batch["input_ids"][0].tolist() == inputs["input_ids"][0].tolist()
        pixels, grid = hf_pixels(batch["pixel_values"])
        assert torch.equal(grid, inputs["image_grid_thw"])
        assert (pixels - inputs["pixel_values"]).abs().max() <= 1e-5
    assert len(set(answers)) == len(paths)
    return spec, inputs, batch


def test_qwen2_vl_folder_generates_as_transformers(tmp_path: Path) -> None:
    from test_parity_qwen2_vl import hf_pixels, qwen2_vl

    hf_dir = tmp_path / "hf"
    hf = qwen2_vl(hf_dir, seed=2)
    tok, images = qwen_folder(hf_dir)
    wide = noise_image(tmp_path / "wide.png", (90, 40))  # -> 32 x 96: 2 x 6 tokens
    tall = noise_image(tmp_path / "tall.png", (30, 52))  # -> 48 x 32: 3 x 2 tokens

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    spec, inputs, batch = qwen_cli_matches(hf_dir, tmp_path, model, tok, images, [wide, tall], hf_pixels)
    assert "mean = [0.5, 0.4, 0.3]" in spec and "dynamic(min_pixels = 1024, max_pixels = 4096)" in spec
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")}
    px = batch["pixel_values"]
    assert_sees_image(lambda p: hf(pixel_values=hf_pixels(p)[0], **kw).logits, px)

"""InternVL: a tiny `InternVLForConditionalGeneration` (InternViT tower with layer scale, 2 x 2 pixel shuffle +
LayerNorm / 2-layer MLP projector, Qwen2 text model) made here with every parameter randomised, imported; images
cut into dynamic tiles (grid by aspect ratio + thumbnail) give transformers' pixels, prompt and logits, for
non-square images of different tile counts, a two-image prompt, a mixed batch, the CLI path and the export."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, assert_sees_image, imported, laid_out_transform, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")
MARKERS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
VOCAB = 128
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% for c in message['content'] "
            "| selectattr('type', 'equalto', 'image') %}{{ '<IMG_CONTEXT>\n' }}{% endfor %}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
            "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenizer():
    """Single characters, InternVL's image markers (named as its processor reads them), ids up to VOCAB."""
    from tokenizers import Tokenizer, decoders, models, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    table = specials + [c for c in string.printable if c not in "\t\r\x0b\x0c"] + list(MARKERS.values())
    table += [f"<x{i}>" for i in range(len(table), VOCAB)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", extra_special_tokens=MARKERS)
    fast.add_special_tokens({"additional_special_tokens": list(MARKERS.values())})
    return fast


TOK = None


def ids_of(name: str) -> int:
    global TOK
    TOK = TOK or tokenizer()
    return TOK.convert_tokens_to_ids(MARKERS[name])


@pytest.fixture
def no_video(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers without torchvision has no video processor class to check InternVLProcessor's (absent)
    video processor against; any object passes for these image-only tests."""
    from transformers import processing_utils

    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", object, raising=False)


def image_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                    max_patches=4, image_mean=IMAGENET[0], image_std=IMAGENET[1])


def internvl(out: Path, seed: int = 0):
    _quiet(transformers)
    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False),
        image_token_id=ids_of("context_image_token"), image_seq_length=4, downsample_ratio=0.5,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.InternVLForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    image_processor().save_pretrained(str(out))
    return m


def folder(out: Path, seed: int = 0):
    """The checkpoint with InternVL's processor (image processor, tokenizer with its markers, template)."""
    m = internvl(out, seed)
    tokenizer().save_pretrained(str(out))  # InternVLProcessor.save_pretrained needs its video half (torchvision)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                           "image_seq_length": 4}))
    return m


def processor_of(model_dir: Path):
    """InternVLProcessor from the folder's files (AutoProcessor would load its video half too, which needs
    torchvision): the saved image processor and tokenizer, `image_seq_length`, the chat template."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    seq = json.loads((model_dir / "processor_config.json").read_text())["image_seq_length"]
    return transformers.InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil.from_pretrained(str(model_dir)),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(model_dir)), image_seq_length=seq,
        chat_template=(model_dir / "chat_template.jinja").read_text())



def _ids(*counts: int) -> torch.Tensor:
    """Text, then per image `<img>`, `count` context tokens, `</img>`, then text."""
    row = [1, 5, 7]
    for n in counts:
        row += [ids_of("start_image_token")] + [ids_of("context_image_token")] * n + [ids_of("end_image_token")] + [9]
    return torch.tensor([[*row, 11, 13]])


# (width, height): 90 x 40 takes a 1 x 2 grid (+ thumbnail), 50 x 70 a 2 x 1 grid, 30 x 30 one tile alone
@pytest.mark.parametrize("size", [(90, 40), (50, 70), (30, 30)], ids=["wide", "tall", "one-tile"])
def test_internvl_parity(no_video, tmp_path, size):
    hf = folder(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report
    assert "layout = dynamic_tiles(min = 1, max = 4, thumbnail = true)" in mapping["spec"]
    path = noise_image(tmp_path / "img.png", size)
    from PIL import Image

    processor = processor_of(tmp_path / "hf")
    theirs = processor(images=[Image.open(path).convert("RGB")], text=["a<IMG_CONTEXT>b"], return_tensors="pt")
    transform = laid_out_transform(ours)
    item = transform(path)
    assert item.pixels.shape == theirs["pixel_values"].shape
    assert float((item.pixels - theirs["pixel_values"]).abs().max()) < 1e-5
    n = transform.tokens(item, 4)
    assert n == int((theirs["input_ids"] == ids_of("context_image_token")).sum())
    ids = _ids(n)
    px, sizes = transform.stack([item])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=item.pixels).logits
        got = ours(ids, pixel_values=px, image_sizes=sizes).logits
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=p).logits, item.pixels)
    diff = float((ref - got).abs().max())
    print(f"size {size}: {item.tiles} tiles, {n} tokens, max logit diff {diff:.2e}")
    assert diff < 1e-4
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=item.pixels, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        gen = ours.generate(ids, pixel_values=px, image_sizes=sizes, max_new_tokens=16)[0]
    assert gen.tolist()[: len(want)] == want.tolist()


def test_internvl_two_images_and_a_mixed_batch(no_video, tmp_path):
    """Two images of different tile counts in one prompt (their tiles one after the other, as transformers
    concatenates them), and a batch of two rows whose images take different token counts."""
    hf = folder(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    transform = laid_out_transform(ours)
    items = [transform(noise_image(tmp_path / f"{i}.png", size)) for i, size in enumerate([(90, 40), (30, 30)])]
    counts = [transform.tokens(x, 4) for x in items]
    assert counts[0] != counts[1]
    px, sizes = transform.stack(items)
    ids = _ids(*counts)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.cat([x.pixels for x in items])).logits
        got = ours(ids, pixel_values=px[None], image_sizes=sizes[None]).logits
    assert float((ref - got).abs().max()) < 1e-4
    rows = [_ids(c)[0].tolist() for c in counts]
    width = max(map(len, rows))
    batch = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        got = ours(batch, attention_mask=mask, pixel_values=px, image_sizes=sizes).logits
        for i, (row, item) in enumerate(zip(rows, items, strict=True)):
            ref = hf(input_ids=torch.tensor([row]), pixel_values=item.pixels).logits[0]
            assert float((ref - got[i, width - len(row):]).abs().max()) < 1e-4


def _hf_answer(model_dir: Path, image: Path, question: str, new: int) -> str:
    from test_import_folder import hf_generate

    processor = processor_of(model_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(model_dir)).eval()
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    return hf_generate(processor, model, image, question, new)[0]


def test_internvl_folder_generates_as_transformers(no_video, tmp_path):
    """`vlm import-hf -> build -> generate` on two images of different tile counts answers as transformers'
    InternVLProcessor + chat template + greedy generate on the same folder."""
    from test_import_folder import QUESTION, cli_generate_each

    hf_dir = tmp_path / "hf"
    folder(hf_dir, seed=1)
    images = [noise_image(tmp_path / "wide.png", (90, 40)), noise_image(tmp_path / "tall.png", (50, 70))]
    out, spec = cli_generate_each(hf_dir, tmp_path, images, QUESTION, 12)
    assert 'image_token = "<IMG_CONTEXT>"' in spec
    want = [_hf_answer(hf_dir, image, QUESTION, 12) for image in images]
    assert out.split("\n") == want and all(want)


def test_internvl_round_trips_and_the_export_answers_as_vlm_generate(no_video, tmp_path):
    """`import-hf -> build -> export-hf` gives every tensor back bit for bit (layer scales included), and
    transformers' processor + model on the export answer as `vlm generate` on the built folder."""
    from hf_tiny import export_round_trip
    from test_import_folder import QUESTION, runner

    from vlmspec.cli import app

    hf_dir = tmp_path / "hf"
    folder(hf_dir, seed=1)
    built, back = export_round_trip(hf_dir, tmp_path)
    image = noise_image(tmp_path / "wide.png", (90, 40))
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    want = _hf_answer(back, image, QUESTION, 12)
    assert r.stdout.strip() == want and want

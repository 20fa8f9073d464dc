"""LLaVA-NeXT (any resolution): a tiny `LlavaNextForConditionalGeneration` made here, imported; our processor's
tiles equal transformers' (best pinpoint, resize + pad, base tile first), and the logits and greedy tokens match
for non-square images that choose different pinpoints and need rows / columns unpadded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, _quiet, anyres_parity, imported, laid_out_transform, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32]]


def llava_next(out: Path):
    _quiet(transformers)
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512),
        image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    m = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    randomise(m, fresh=("image_newline",))
    m.save_pretrained(str(out))
    proc = transformers.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                image_grid_pinpoints=PINPOINTS)
    proc.save_pretrained(str(out))
    return m, proc


# (width, height): 40 x 90 takes the 96 x 32 canvas (3 tiles) and loses grid rows to unpadding; 50 x 70 takes
# 64 x 64 (2 x 2 tiles) and loses columns
@pytest.mark.parametrize("size", [(40, 90), (50, 70)], ids=["3x1-unpad-rows", "2x2-unpad-columns"])
def test_llava_next_parity(tmp_path, size):
    hf, proc = llava_next(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report
    path = noise_image(tmp_path / "img.png", size)
    from PIL import Image

    theirs = proc(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    transform = laid_out_transform(ours)
    item = transform(path)
    assert item.pixels.shape == theirs["pixel_values"][0].shape
    assert float((item.pixels - theirs["pixel_values"][0]).abs().max()) < 1e-5
    assert list(theirs["image_sizes"][0].tolist()) == list(item.size)
    n = transform.tokens(item)
    px, sizes = transform.stack([item])
    ids = torch.tensor([[1, 5, 7] + [IMAGE_TOKEN] * n + [9, 11, 13]])
    diff = anyres_parity(hf, ours, ids, px, sizes)
    print(f"size {size}: {n} tokens, {px.shape[1]} tiles, max logit diff {diff:.2e}")
    assert n < transform.layout.model_copy(update={"unpad": False}).tokens(*item.size, 32, 8)  # padding was cut
    assert diff < 1e-4


def test_llava_next_two_images_in_one_prompt(tmp_path):
    """Two images of different sizes (different pinpoints) in one prompt: each laid out at its own size,
    their tokens one after the other, as transformers splices them."""
    hf, _ = llava_next(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    transform = laid_out_transform(ours)
    items = [transform(noise_image(tmp_path / f"{i}.png", size)) for i, size in enumerate([(40, 90), (50, 70)])]
    counts = [transform.tokens(x) for x in items]
    assert counts[0] != counts[1]
    px, sizes = transform.stack(items)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * counts[0] + [7] + [IMAGE_TOKEN] * counts[1] + [9, 11]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
        got = ours(ids, pixel_values=px[None], image_sizes=sizes[None]).logits
    assert float((ref - got).abs().max()) < 1e-4


def test_llava_next_batch_of_two_sizes(tmp_path):
    """Two rows whose images take different token counts (left-padded prompts, features right-padded with
    their lengths): each row's logits equal transformers' on that row alone, and so do its greedy tokens."""
    hf, _ = llava_next(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    transform = laid_out_transform(ours)
    items = [transform(noise_image(tmp_path / f"{i}.png", size)) for i, size in enumerate([(40, 90), (50, 70)])]
    rows = [[1, 5] + [IMAGE_TOKEN] * transform.tokens(x) + [9, 11] for x in items]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    px, sizes = transform.stack(items)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=px, image_sizes=sizes).logits
        gen = ours.generate(ids, attention_mask=mask, pixel_values=px, image_sizes=sizes, max_new_tokens=16)
        for i, (row, item) in enumerate(zip(rows, items, strict=True)):
            one = transform.stack([item])
            ref = hf(input_ids=torch.tensor([row]), pixel_values=one[0], image_sizes=one[1]).logits[0]
            assert float((ref - got[i, width - len(row):]).abs().max()) < 1e-4
            want = hf.generate(input_ids=torch.tensor([row]), pixel_values=one[0], image_sizes=one[1],
                               max_new_tokens=16, do_sample=False)[0, len(row):]
            assert gen[i].tolist()[: len(want)] == want.tolist()


def test_llava_next_folder_generates_as_transformers(tmp_path):
    """`vlm import-hf -> build -> generate` on two images of different sizes (batched one token count at a
    time) answers as transformers' processor + chat template + greedy generate."""
    from test_import_folder import QUESTION, char_tokenizer, cli_generate_each, hf_generate

    hf_dir = tmp_path / "hf"
    llava_next(hf_dir)
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% for c in "
                "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for c "
                "in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
                "{{ ' [/INST]' }}{% endif %}{% endfor %}")
    proc = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32},
                                                             image_grid_pinpoints=PINPOINTS),
        tokenizer=char_tokenizer(), patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    proc.save_pretrained(str(hf_dir))
    images = [noise_image(tmp_path / "wide.png", (90, 40)), noise_image(tmp_path / "tall.png", (50, 70))]
    out, spec = cli_generate_each(hf_dir, tmp_path, images, QUESTION, 12)
    assert "layout = anyres(" in spec
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    want = [hf_generate(processor, model, image, QUESTION, 12)[0] for image in images]
    assert out.split("\n") == want and all(want)


def test_llava_next_round_trips_and_the_export_answers_as_vlm_generate(tmp_path):
    """`vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for bit (`image_newline`
    included), and transformers reads the export (config, pinpoints, processor) to the answers `vlm generate`
    gives on the built folder."""
    from hf_tiny import export_round_trip
    from test_import_folder import QUESTION, char_tokenizer, hf_generate, runner

    from vlmspec.cli import app

    hf_dir = tmp_path / "hf"
    llava_next(hf_dir)
    transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32},
                                                             image_grid_pinpoints=PINPOINTS),
        tokenizer=char_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1).save_pretrained(str(hf_dir))
    built, back = export_round_trip(hf_dir, tmp_path)
    processor = transformers.AutoProcessor.from_pretrained(str(back))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    for name, size in (("wide.png", (90, 40)), ("tall.png", (50, 70))):
        image = noise_image(tmp_path / name, size)
        r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                                "--max-new-tokens", "12"])
        assert r.exit_code == 0, r.output
        want, _ = hf_generate(processor, model, image, QUESTION, 12)
        assert r.stdout.strip() == want and want

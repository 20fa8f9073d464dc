"""LLaVA-OneVision: a tiny `LlavaOnevisionForConditionalGeneration` (SigLIP tower, Qwen2 text model) made here,
imported; our processor's tiles equal transformers' PIL processor's, and the logits and greedy tokens match for
non-square images whose grids are unpadded and pooled down (`anyres_max_2`), for one that is not pooled, and for a
two-image prompt (each image one padded square)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, _quiet, anyres_parity, imported, laid_out_transform, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]
MEAN = [0.5, 0.5, 0.5]


def onevision(out: Path):
    _quiet(transformers)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False),
        image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN - 1, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_2")
    torch.manual_seed(4)  # a seed whose greedy answers differ between the test images
    m = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    randomise(m, fresh=("image_newline",), seed=4)
    m.save_pretrained(str(out))
    proc = image_processor()
    proc.save_pretrained(str(out))
    return m, proc


def image_processor():
    return transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS,
                                                        image_mean=MEAN, image_std=MEAN)



# (width, height): 40 x 90 takes 96 x 32... each choice below exercises unpadding and, past two tiles' worth of
# tokens, the bilinear pooling; 30 x 30 takes one tile (a 4 x 4 grid, not pooled)
@pytest.mark.parametrize("size", [(40, 90), (70, 50), (90, 95), (30, 30)],
                         ids=["tall-pooled", "wide-pooled", "3x3-pooled", "one-tile"])
def test_onevision_parity(tmp_path, size):
    hf, proc = onevision(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report
    assert "max_tiles = 2, multi_image = square" in mapping["spec"]
    path = noise_image(tmp_path / "img.png", size)
    from PIL import Image

    theirs = proc(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    transform = laid_out_transform(ours)
    item = transform(path)
    assert item.pixels.shape == theirs["pixel_values"][0].shape
    assert float((item.pixels - theirs["pixel_values"][0]).abs().max()) < 1e-5
    n = transform.tokens(item)
    g = 4
    pooled = transform.layout.model_copy(update={"max_tiles": None}).tokens(*item.size, 32, 8)
    if size != (30, 30):
        assert n < pooled  # the grid was pooled down
    px, sizes = transform.stack([item])
    ids = torch.tensor([[1, 5, 7] + [IMAGE_TOKEN] * n + [9, 11, 13]])
    diff = anyres_parity(hf, ours, ids, px, sizes)
    print(f"size {size}: {n} tokens ({g * g} base), {px.shape[1]} tiles, max logit diff {diff:.2e}")
    assert diff < 1e-4


def test_onevision_two_images_in_one_prompt(tmp_path):
    """Two images in one prompt: OneVision's processor pads each to a square of the mean colour and reads it
    as one tile (its tokens, then the newline); `one_of_several` does the same, and the logits match."""
    hf, proc = onevision(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    from PIL import Image

    transform = laid_out_transform(ours)
    paths = [noise_image(tmp_path / f"{i}.png", size) for i, size in enumerate([(40, 90), (70, 50)])]
    items = [transform.one_of_several(p) for p in paths]
    theirs = proc(images=[[Image.open(p).convert("RGB") for p in paths]], return_tensors="pt")
    px, sizes = transform.stack(items)
    assert px.shape == theirs["pixel_values"].shape
    assert float((px - theirs["pixel_values"]).abs().max()) < 1e-5
    counts = [transform.tokens(x) for x in items]
    assert counts == [17, 17]
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * counts[0] + [7] + [IMAGE_TOKEN] * counts[1] + [9, 11]])
    kw = dict(pixel_values=theirs["pixel_values"], image_sizes=theirs["image_sizes"],
              batch_num_images=theirs["batch_num_images"])
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits
        got = ours(ids, pixel_values=px[None], image_sizes=sizes[None]).logits
    assert float((ref - got).abs().max()) < 1e-4


def test_onevision_summary_range_holds_every_count(tmp_path):
    """The token range `vlm summary` prints bounds the count of every image size."""
    _, _ = onevision(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    layout = laid_out_transform(ours).layout
    lo, hi = layout.min_tokens(32, 8), layout.max_tokens(32, 8)
    counts = {layout.tokens(h, w, 32, 8) for h in range(8, 200, 7) for w in range(8, 200, 11)}
    assert lo <= min(counts) and max(counts) <= hi
    assert hi < layout.model_copy(update={"max_tiles": None}).max_tokens(32, 8)


TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|im_start|>user ' }}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for c in "
            "message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
            "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")


def _folder(hf_dir: Path):
    """The tiny checkpoint with a tokenizer and chat template (OneVision's `LlavaOnevisionProcessor` needs
    torchvision for its video half, which this environment lacks; its image processor and token count are
    used directly)."""
    from test_import_folder import char_tokenizer

    onevision(hf_dir)
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(hf_dir))
    (hf_dir / "chat_template.jinja").write_text(TEMPLATE)
    return tok


def _transformers_answer(model_dir: Path, tok, image: Path, question: str, new: int) -> str:
    """transformers' image processor, OneVision's own image-token count (`_get_number_of_features`), the
    chat template, and greedy `generate` on `model_dir`."""
    from PIL import Image

    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    proc = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(str(model_dir))
    inputs = proc(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    counter = object.__new__(transformers.LlavaOnevisionProcessor)
    counter.image_processor, counter.num_image_tokens = proc, 16
    counter.vision_aspect_ratio = model.config.vision_aspect_ratio
    n = counter._get_number_of_features(*inputs["image_sizes"][0].tolist(), 32, 32)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text.replace("<image>", "<image>" * n), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                             max_new_tokens=new, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_onevision_folder_generates_as_transformers(tmp_path):
    """`vlm import-hf -> build -> generate` on two images of different sizes answers as transformers does."""
    from test_import_folder import QUESTION, cli_generate_each

    hf_dir = tmp_path / "hf"
    tok = _folder(hf_dir)
    images = [noise_image(tmp_path / "wide.png", (90, 40)), noise_image(tmp_path / "tall.png", (50, 70))]
    out, spec = cli_generate_each(hf_dir, tmp_path, images, QUESTION, 12)
    assert "max_tiles = 2, multi_image = square" in spec
    want = [_transformers_answer(hf_dir, tok, image, QUESTION, 12) for image in images]
    assert out.split("\n") == want and all(want)


def test_onevision_round_trips_and_the_export_answers_as_vlm_generate(tmp_path):
    """`import-hf -> build -> export-hf` gives every tensor back bit for bit (`image_newline` included), the
    export's config and image processor are OneVision's, and transformers answers on it as `vlm generate`."""
    from hf_tiny import export_round_trip
    from test_import_folder import QUESTION, runner

    from vlmspec.cli import app

    hf_dir = tmp_path / "hf"
    tok = _folder(hf_dir)
    built, back = export_round_trip(hf_dir, tmp_path)
    config = transformers.AutoConfig.from_pretrained(str(back))
    assert type(config).__name__ == "LlavaOnevisionConfig" and config.vision_aspect_ratio == "anyres_max_2"
    assert config.vision_config.model_type == "siglip_vision_model"
    image = noise_image(tmp_path / "wide.png", (90, 40))
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    want = _transformers_answer(back, tok, image, QUESTION, 12)
    assert r.stdout.strip() == want and want

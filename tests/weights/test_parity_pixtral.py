"""Pixtral (mistral-community/pixtral-12b's layout: `LlavaForConditionalGeneration` whose vision_config is
`pixtral`, a Mistral text model): import a tiny one and compare with transformers on non-square images read at
their own size: logits within 1e-4 (fp32), 16 greedy tokens identical, a batch of two images of different sizes
in one forward (transformers concatenates them into one sequence with a block-diagonal mask), the pixels as
`PixtralImageProcessorPil` makes them and the ids as `PixtralProcessor` writes them (`[IMG]` per patch,
`[IMG_BREAK]` after each row, `[IMG_END]` last; PixtralProcessor itself needs torchvision, so its layout is
written out here), and the CLI path import -> build -> generate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, export_round_trip, imported, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

PATCH, LONGEST = 8, 64
WORDS = ["what", "is", "in", "the", "picture", "red", "square", "a", "circle", "blue"]
SPECIALS = ["<unk>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
IMG, BREAK, END, BOS = VOCAB["[IMG]"], VOCAB["[IMG_BREAK]"], VOCAB["[IMG_END]"], VOCAB["<s>"]
N_VOCAB = 96
QUESTION = "what is in the picture"


def tokenizer(out: Path):
    """A word-level tokenizer holding Pixtral's special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


def image_processor():
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": LONGEST}, patch_size={"height": PATCH, "width": PATCH})


def pixtral_llava(out: Path, *, seed: int = 0, layer: int = -1):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=LONGEST, patch_size=PATCH, hidden_act="silu",
                           rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}),
        text_config=dict(model_type="mistral", vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512, sliding_window=None, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        image_token_index=IMG, vision_feature_layer=layer, vision_feature_select_strategy="full",
        projector_hidden_act="gelu")
    torch.manual_seed(seed)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wider than the 0.02 init: logits that vary with the image, answers that vary
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    tokenizer(out)
    ip = image_processor()
    ip.save_pretrained(str(out))
    return m, ip


def reference_ids(rows: int, cols: int, text: str = QUESTION) -> list[int]:
    """PixtralProcessor's layout of `<s>[IMG]...` + the text: each row's `[IMG]`s then `[IMG_BREAK]`, the last
    break replaced by `[IMG_END]`."""
    image = ([IMG] * cols + [BREAK]) * rows
    image[-1] = END
    return [BOS, *image, *(VOCAB[w] for w in text.split())]


@pytest.fixture
def model(tmp_path):
    hf, ip = pixtral_llava(tmp_path / "hf")
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), report
    assert set(mapping["components"]) == {"vit", "proj", "llm"}
    return hf, ip, ours, mapping


def processor(tmp_path, mapping):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    return Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))


def test_pixtral_llava_parity_on_a_non_square_image(tmp_path, model):
    hf, ip, ours, mapping = model
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    text = mapping["spec"]
    assert "vision vit = pixtral" in text and "head_dim = 32" in text and 'image_token = "[IMG]"' in text
    non_square_matches(tmp_path, hf, ip, ours, mapping, PATCH)


def non_square_matches(tmp_path, hf, ip, ours, mapping, unit: int) -> None:
    """A 100x45 image (read as 64x32): pixels and prompt ids equal the reference's, logits within 1e-4,
    16 greedy tokens identical, and the reference sees the image."""
    from PIL import Image

    proc = processor(tmp_path, mapping)
    image = noise_image(tmp_path / "img.png", (100, 45), colour=True)  # w x h: scaled to 64 x 28 -> 64 x 32
    batch = proc.generation_batch([QUESTION], [image])
    ref = ip(images=[Image.open(image)], return_tensors="pt")
    assert ref["image_sizes"].tolist() == [[32, 64]]
    px = ref["pixel_values"]
    assert batch["pixel_values"].shape == px.shape and (batch["pixel_values"] - px).abs().max() <= 1e-5
    ids = torch.tensor([reference_ids(32 // unit, 64 // unit)])
    assert batch["input_ids"].tolist() == ids.tolist()

    kw = dict(pixel_values=px, image_sizes=ref["image_sizes"])
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=p, image_sizes=kw["image_sizes"]).logits, px)
    with torch.no_grad():
        want = hf(input_ids=ids, **kw).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    assert (want - got).abs().max() <= 1e-4
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, **kw, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0, eos_token_id=None, suppress_tokens=[IMG])[:, ids.shape[1]:]
    mine = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], max_new_tokens=16)
    assert torch.equal(mine, gen)


def two_sizes_match(tmp_path, hf, ip, ours, mapping, unit: int) -> None:
    """A 37x61 and a 90x20 image in one left-padded batch, as transformers takes them (one sequence, a
    block-diagonal mask, each grid merged on its own; images of `unit` pixels per token): pixels, prompt ids,
    each row's logits (1e-4) and 16 greedy tokens match, and the reference sees the images."""
    from PIL import Image

    images = [noise_image(tmp_path / "a.png", (37, 61)), noise_image(tmp_path / "b.png", (90, 20), colour=True)]
    ref = ip(images=[Image.open(i) for i in images], return_tensors="pt")
    sizes = ref["image_sizes"].tolist()
    assert sizes == [[64, 40], [16, 64]]
    rows = [reference_ids(h // unit, w // unit) for h, w in sizes]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"])
    proc = processor(tmp_path, mapping)
    px, our_sizes = proc.stack([proc.image_transform(i) for i in images])
    assert our_sizes.tolist() == sizes and (px - ref["pixel_values"]).abs().max() <= 1e-5
    assert [proc.encode_prompt(QUESTION, 1, proc.image_slot(proc.image_transform(i))) for i in images] == rows
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p,
                                   image_sizes=kw["image_sizes"]).logits, kw["pixel_values"], real=mask.bool())
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **kw).logits
        got = ours(ids, attention_mask=mask, pixel_values=px, image_sizes=our_sizes).logits
    real = mask.bool()
    assert (want[real] - got[real]).abs().max() <= 1e-4
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=mask, **kw, max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMG])
    mine = ours.generate(ids, attention_mask=mask, pixel_values=px, image_sizes=our_sizes, max_new_tokens=16)
    assert torch.equal(mine, gen[:, ids.shape[1]:])


def test_pixtral_llava_batch_of_two_sizes(tmp_path, model):
    """Two images of different sizes in one batch, padded with their image_sizes, as transformers takes them (one
    sequence, a block-diagonal mask): each left-padded row's logits match, and so do 16 greedy tokens."""
    hf, ip, ours, mapping = model
    two_sizes_match(tmp_path, hf, ip, ours, mapping, PATCH)


def test_pixtral_vision_tower_matches(tmp_path, model):
    """The tower alone, on a non-square grid: our features against `PixtralVisionModel`'s last hidden state."""
    hf, _, ours, _ = model
    px = torch.randn(1, 3, 24, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.model.vision_tower(px, image_sizes=torch.tensor([[24, 56]])).last_hidden_state
        got = ours.components["vit"](px).x
    assert got.shape == want.shape and (want - got).abs().max() <= 1e-5


def test_pixtral_cli_import_build_generate(tmp_path):
    """`vlm import-hf` -> `vlm build` -> `vlm generate` answers as transformers does on the same image."""
    hf, ip = pixtral_llava(tmp_path / "hf", seed=1)
    assert cli_answers_as_transformers(tmp_path, hf, ip, PATCH, checks=("check",))


def cli_answers_as_transformers(tmp_path, hf, ip, unit: int, checks: tuple[str, ...]) -> str:
    """The folder at tmp_path/hf through `vlm import-hf`, each of `checks` (`check`, `fmt --check`) on the spec,
    `vlm build` and `vlm generate` on a 50x30 image: the printed answer (returned) is transformers' greedy one."""
    from PIL import Image
    from typer.testing import CliRunner

    from vlmspec.cli import app

    runner = CliRunner()
    spec, built = tmp_path / "imported.vlm", tmp_path / "built"
    for args in (["import-hf", str(tmp_path / "hf"), "-o", str(spec)], *[[*c.split(), str(spec)] for c in checks],
                 ["build", str(spec), "-o", str(built)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    image = noise_image(tmp_path / "img.png", (50, 30), colour=True)
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", "16"])
    assert r.exit_code == 0, r.output
    ref = ip(images=[Image.open(image)], return_tensors="pt")
    h, w = ref["image_sizes"][0].tolist()
    ids = torch.tensor([reference_ids(h // unit, w // unit)])
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"],
                          max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=VOCAB["</s>"],
                          suppress_tokens=[IMG])[0, ids.shape[1]:]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    words = [t for t in gen.tolist() if t != VOCAB["</s>"]]
    assert words and r.stdout.strip() == tok.decode(words, skip_special_tokens=True).strip()
    return r.stdout.strip()


def test_pixtral_llava_export_round_trip(tmp_path):
    """import -> build -> export-hf gives the checkpoint's tensors back under the same keys, with a `pixtral`
    vision_config and PixtralProcessor's files; transformers loads the export to the same logits."""
    import json

    hf, _ = pixtral_llava(tmp_path / "hf", seed=3)
    _, back = export_round_trip(tmp_path / "hf", tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "pixtral" and config["vision_feature_select_strategy"] == "full"
    pre = json.loads((back / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": LONGEST} and pre["image_processor_type"] == "PixtralImageProcessor"
    again = transformers.LlavaForConditionalGeneration.from_pretrained(str(back)).eval()
    ids = torch.tensor([reference_ids(2, 3)])
    px = torch.randn(1, 3, 2 * PATCH, 3 * PATCH, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor([[2 * PATCH, 3 * PATCH]])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, pixel_values=px, image_sizes=sizes).logits,
                           again(input_ids=ids, pixel_values=px, image_sizes=sizes).logits)


def test_pixtral_token_counts_of_the_spec():
    """The tiny spec's processor facts without a checkpoint: a 100 x 45 image takes 4 rows of 8 `[IMG]`s, and
    the data plan counts its 36 positions (each row's break / end token too); the tokenizer gains the break and
    end tokens as special tokens."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor
    from vlmspec.runtime.inputs.token_count import ImageTokens
    from vlmspec.runtime.inputs.tokenizer import byte_tokenizer, ensure_special_tokens

    analysis, _ = load_analysis(f"{Path(__file__).parents[2] / 'specs' / 'pixtral-12b.vlm'}:pixtral_12b_tiny")
    assert ImageTokens(analysis)(45, 100) == 4 * (8 + 1)
    tok = ensure_special_tokens(byte_tokenizer(), analysis)
    proc = Processor(analysis, tok)
    slot = proc.image_slot(torch.zeros(3, 32, 64))
    assert slot == ("[IMG]" * 8 + "[IMG_BREAK]") * 3 + "[IMG]" * 8 + "[IMG_END]"
    ids = proc.encode_prompt("hi", 1, slot)
    vocab = tok.get_vocab()
    assert ids.count(vocab["[IMG]"]) == 32 and ids.count(vocab["[IMG_BREAK]"]) == 3 and ids.count(vocab["[IMG_END]"]) == 1


def test_pixtral_tiny_spec_trains_on_mixed_sizes(tmp_path):
    """`vlm train` on images of several sizes and aspect ratios: each read at its own size (rows of image tokens
    with their break / end tokens), rows of different sizes in one batch; then `vlm generate` answers."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from vlmspec.cli import app

    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, (w, h) in enumerate([(32, 32), (48, 16), (16, 48), (100, 45)] * 2):
        Image.new("RGB", (w, h), (40 * i % 255, 120, 200)).save(images / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    spec = f"{Path(__file__).parents[2] / 'specs' / 'pixtral-12b.vlm'}:pixtral_12b_tiny"
    runner = CliRunner()
    r = runner.invoke(app, ["train", spec, "--data", str(tmp_path), "-o", str(tmp_path / "run"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "run" / "final"), "--image", str(images / "3.png"),
                            "--prompt", "What colour is it?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output

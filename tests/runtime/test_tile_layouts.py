"""The tile layouts of InternVL 2.5 (`dynamic_tiles`) and Idefics3 / SmolVLM (`split`) against Hugging Face's
PIL image processors and processors, offline, with small tiles so each case is quick: the same pixels in the
same order, the same grid, and the same prompt text for each image."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from vlmspec.compiler.schema.base import CallValue
from vlmspec.compiler.schema.tile_layouts import DynamicTiles, Split
from vlmspec.runtime.inputs.tiling import DynamicTilesTransform, SplitTransform

transformers = pytest.importorskip("transformers")

#: (height, width): wide, tall, landscape, tiny, very wide, and an exact 2:1
SIZES = [(37, 90), (90, 37), (300, 200), (20, 20), (400, 1000), (1000, 400), (5, 120), (64, 32)]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def tokenizer(specials: list[str], named: dict[str, str] | None = None):
    """A lossless tokenizer: single printable characters and these special tokens (the `named` ones also as
    attributes, such as `start_image_token`, which InternVL's processor reads)."""
    from tokenizers import Tokenizer, decoders, models

    table = ["<unk>", "<s>", "</s>", "<pad>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"] + specials
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", extra_special_tokens=named or {})
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


@pytest.fixture
def no_video(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchvision transformers has no video processor class to check a processor's (absent) video
    processor against; any object passes for these image-only tests."""
    from transformers import processing_utils

    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", object, raising=False)


def expanded(processor, tok, images: list[Image.Image], text: str) -> tuple[str, dict]:
    out = processor(images=images, text=[text], return_tensors="pt")
    return tok.decode(out["input_ids"][0]), out


def spec_value(text: str) -> object:
    """`text` as the spec evaluates an attribute value (a `CallValue` for a call)."""
    from vlmspec.compiler.resolve import _Resolver
    from vlmspec.diagnostics import DiagnosticSink
    from vlmspec.grammar.parser import parse

    model = parse(f"model m {{\n  vision v = vit {{ layout = {text} }}\n}}\n").models[0]
    attr = model.items[0].block.items[0]
    return _Resolver(None, model, DiagnosticSink()).eval(attr.value, "v")


# ------------------------------------------------------------------------------------------------ InternVL


@pytest.mark.parametrize(("least", "most"), [(1, 6), (1, 12), (2, 4), (1, 1)])
def test_dynamic_tiles_match_internvl(no_video, least: int, most: int) -> None:
    s, per_tile = 16, 3
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": s, "width": s}, min_patches=least, max_patches=most,
                                  image_mean=IMAGENET[0], image_std=IMAGENET[1])
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = tokenizer(list(names.values()), names)
    proc = transformers.InternVLProcessor(image_processor=ip, tokenizer=tok, image_seq_length=per_tile)
    layout = DynamicTiles(min=least, max=most)
    tf = DynamicTilesTransform(s, *IMAGENET, "bicubic", layout)
    for i, (h, w) in enumerate(SIZES):
        img = noise(h, w, i)
        text, out = expanded(proc, tok, [img], "a<IMG_CONTEXT>b")
        item = tf(img)
        ref = out["pixel_values"]
        assert item.pixels.shape == ref.shape, (h, w)
        torch.testing.assert_close(item.pixels, ref.float(), atol=1e-5, rtol=0)
        assert item.size == (h, w)
        assert item.tiles == layout.tiles(h, w, s) == ip.get_number_of_image_patches(h, w, {"crop_to_patches": True})
        assert layout.tokens(h, w, s, per_tile) == text.count("<IMG_CONTEXT>")
        assert text == "a" + tf.prompt(item, "<IMG_CONTEXT>", per_tile) + "b"
        assert layout.min_tokens(per_tile) <= layout.tokens(h, w, s, per_tile) <= layout.max_tokens(per_tile)


def test_dynamic_tiles_grid_sweep() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for least, most, s in [(1, 12, 16), (1, 6, 32), (2, 9, 16)]:
        layout = DynamicTiles(min=least, max=most)
        for h in range(1, 300, 7):
            for w in range(1, 300, 11):
                cols, rows = get_optimal_tiled_canvas((h, w), (s, s), least, most)
                assert layout.grid(h, w, s) == (rows, cols), (h, w)


def test_dynamic_tiles_grid_order_and_thumbnail_last() -> None:
    """A 2:1 wide image on up to 6 tiles is 1 row x 2 columns (a small one) or 2 x 4 is not allowed (8 > 6);
    the thumbnail is the whole image at one tile, after the tiles; a 1 x 1 grid has no thumbnail."""
    layout, s = DynamicTiles(max=6), 16
    assert layout.grid(32, 64, s) == (1, 2)
    assert layout.grid(64, 32, s) == (2, 1)
    assert layout.grid(16, 16, s) == (1, 1) and layout.tiles(16, 16, s) == 1
    # an exact tie (1:1 is both 1 x 1 and 2 x 2): the larger grid once the image covers half of it
    assert layout.grid(20, 20, s) == (1, 1) and layout.grid(30, 30, s) == (2, 2)
    img = noise(32, 64)
    item = DynamicTilesTransform(s, *HALF, "bicubic", layout)(img)
    assert item.grid == (1, 2) and item.tiles == 3
    thumb = DynamicTilesTransform(s, *HALF, "bicubic", layout).normalise(img.resize((s, s), Image.Resampling.BICUBIC))
    torch.testing.assert_close(item.pixels[-1], thumb)
    plain = DynamicTilesTransform(s, *HALF, "bicubic", DynamicTiles(max=6, thumbnail=False))(img)
    assert plain.tiles == 2 and torch.equal(plain.pixels, item.pixels[:2])


def test_dynamic_tiles_bounds() -> None:
    s = 16
    for layout in (DynamicTiles(max=6), DynamicTiles(min=2, max=4), DynamicTiles(max=1), DynamicTiles(max=3, thumbnail=False)):
        counts = {layout.tiles(h, w, s) for h in range(1, 200, 7) for w in range(1, 200, 7)}
        assert min(counts) == layout.min_tiles() and max(counts) == layout.max_tiles(), layout
    assert DynamicTiles(max=12).max_tokens(256) == 13 * 256 and DynamicTiles(max=12).min_tokens(256) == 256


# ------------------------------------------------------------------------------------------ Idefics3 / SmolVLM

#: (longest_edge, tile, splitting): a longest edge not a multiple of the tile, one that is, one smaller than a
#: tile, an odd one with an odd tile (a square image becomes one pixel taller than wide), no splitting
SPLITS = [(40, 16, True), (48, 16, True), (12, 16, True), (45, 15, True), (40, 16, False)]


@pytest.mark.parametrize(("edge", "s", "splitting"), SPLITS)
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_split_matches_idefics3_and_smolvlm(no_video, monkeypatch: pytest.MonkeyPatch, family: str, edge: int, s: int,
                                            splitting: bool) -> None:
    per_tile = 2
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Ip
        cls, extra = transformers.Idefics3Processor, {}
    else:
        from transformers.models.smolvlm import processing_smolvlm
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Ip

        # num2words only spells out video frame counts; it is not installed here
        monkeypatch.setattr(processing_smolvlm, "num2words", str)
        cls, extra = transformers.SmolVLMProcessor, {"video_processor": None}
    ip = Ip(size={"longest_edge": edge}, max_image_size={"longest_edge": s}, do_image_splitting=splitting)
    tok = tokenizer(IDEFICS_SPECIALS)
    proc = cls(image_processor=ip, tokenizer=tok, image_seq_len=per_tile, **extra)
    layout = Split(longest_edge=edge, tiles=splitting)
    tf = SplitTransform(s, *HALF, "lanczos", layout)
    for i, (h, w) in enumerate([*SIZES, (45, 45), (44, 44), (10, 26), (16, 6)]):
        img = noise(h, w, i)
        text, out = expanded(proc, tok, [img], "a<image>b")
        item = tf(img)
        ref = out["pixel_values"][0]
        assert item.pixels.shape == ref.shape, (h, w)
        torch.testing.assert_close(item.pixels, ref.float(), atol=1e-5, rtol=0)
        assert item.grid == layout.grid(h, w, s)
        assert text == "a" + tf.prompt(item, "<image>", per_tile) + "b", (h, w)
        assert layout.tokens(h, w, s, per_tile) == text.count("<image>")
        assert layout.min_tokens(s, per_tile) <= layout.tokens(h, w, s, per_tile) <= layout.max_tokens(s, per_tile)


def test_split_grid_sweep_matches_the_processor_not_its_count_helper() -> None:
    """The grid over many sizes equals the rows / columns Idefics3's processor reports with its pixels. (Its
    `get_number_of_image_patches` rounds the shorter side from the original size, not from the rounded longer
    side as the pixels are made, so it disagrees for, e.g., 10 x 26 at longest edge 40 / tile 16; the
    prompt follows the pixels, so the layout does too.)"""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    s, edge = 16, 40
    ip = Idefics3ImageProcessorPil(size={"longest_edge": edge}, max_image_size={"longest_edge": s})
    sizes = [(h, w) for h in range(1, 70, 6) for w in range(1, 70, 7)]
    out = ip(images=[[noise(h, w)] for h, w in sizes], return_row_col_info=True)
    layout = Split(longest_edge=edge)
    assert [layout.grid(h, w, s) for h, w in sizes] == [(r[0], c[0]) for r, c in zip(out["rows"], out["cols"], strict=True)]
    assert ip.get_number_of_image_patches(10, 26)[1:] == (1, 3) and layout.grid(10, 26, s) == (2, 3)


def test_split_batch_pads_like_idefics3(no_video) -> None:
    """Two images with different tile counts: each image's tiles first, zero tiles after, as Idefics3's
    processor pads a sample's images; the facts are the images' sizes, from which the layout counts tiles."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    s, layout = 16, Split(longest_edge=40)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 40}, max_image_size={"longest_edge": s})
    imgs = [noise(37, 90, 1), noise(5, 120, 2)]  # (even a tiny image is scaled up to the longest edge)
    tf = SplitTransform(s, *HALF, "lanczos", layout)
    px, facts = tf.stack([tf(i) for i in imgs])
    ref = ip(images=[imgs], return_tensors="pt")["pixel_values"][0]  # one sample's images, zero-padded
    assert facts.tolist() == [[37, 90], [5, 120]]
    assert [layout.tile_count(h, w, s) for h, w in facts.tolist()] == [7, 4]
    torch.testing.assert_close(px[0], ref[:7].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(px[1, :4], ref[7:11].float(), atol=1e-5, rtol=0)
    assert not px[1, 4:].any()


def test_split_bounds_and_prompt_shape() -> None:
    s = 16
    for layout in (Split(longest_edge=40), Split(longest_edge=45), Split(longest_edge=12), Split(tiles=False)):
        counts = {layout.tokens(h, w, s, 1) for h in range(1, 120, 3) for w in range(1, 120, 3)}
        assert min(counts) == layout.min_tokens(s, 1) and max(counts) == layout.max_tokens(s, 1), layout
    # Idefics3-8B at its published settings: 1456 / 364 -> at most 4 x 4 tiles + the global image
    assert Split().max_tokens(364, 169) == 17 * 169 and Split().min_tokens(364, 169) == 5 * 169
    text = Split(around="[", global_token="G", tile_token="<{row}.{col}>").prompt(2, 1, "i", 2)
    assert text == "[<1.1>ii\n[<2.1>ii\n\n[Gii["
    assert Split().prompt(0, 0, "<image>", 1) == "<fake_token_around_image><global-img><image><fake_token_around_image>"


# ---------------------------------------------------------------------------------------------- the language


@pytest.mark.parametrize("text", [
    "dynamic_tiles(min = 1, max = 12, thumbnail = true)",
    "dynamic_tiles(min = 2, max = 6, thumbnail = false, start = \"<s>\", end = \"</s>\")",
    "split(longest_edge = 1456, tiles = true)",
    "split(longest_edge = 980, tiles = true, around = \"<a \\\"q\\\">\\n\")",
    "split(longest_edge = 1536, tiles = false, around = \"<a>\", global_token = \"<g>\", tile_token = \"<r{row}c{col}>\")",
])
def test_layouts_parse_from_spec_text_and_round_trip(text: str) -> None:
    value = spec_value(text)
    assert isinstance(value, CallValue)
    cls = DynamicTiles if value.name == "dynamic_tiles" else Split
    layout = cls.model_validate(value)
    assert layout.to_vlm() == text
    assert cls.model_validate(spec_value(layout.to_vlm())) == layout


def test_layout_defaults_are_the_published_settings() -> None:
    internvl = DynamicTiles.model_validate(spec_value("dynamic_tiles()"))
    assert (internvl.min, internvl.max, internvl.thumbnail, internvl.start, internvl.end) == (1, 12, True, "<img>", "</img>")
    idefics = Split.model_validate(spec_value("split()"))
    assert (idefics.longest_edge, idefics.tiles) == (1456, True)
    assert idefics.tile_token.format(row=2, col=3) == "<row_2_col_3>"


@pytest.mark.parametrize(("cls", "text", "message"), [
    (DynamicTiles, "dynamic_tiles(min = 6, max = 4)", "`min = 6` tiles is more than `max = 4`"),
    (DynamicTiles, "dynamic_tiles(max = 0)", "greater than 0"),
    (DynamicTiles, "dynamic_tiles(max = 1000)", "less than or equal to 256"),
    (DynamicTiles, "dynamic_tiles(tiles = 4)", "Extra inputs"),
    (DynamicTiles, "split()", "expected `dynamic_tiles("),
    (DynamicTiles, "dynamic_tiles(4)", "expected `dynamic_tiles("),
    (Split, "split(longest_edge = 5000)", "less than or equal to 4096"),
    (Split, "split(tile_token = \"<{r}>\")", "can only use `{row}` and `{col}`"),
    (Split, "split(around = \"\")", "at least 1 character"),
    (Split, "anyres()", "expected `split("),
])
def test_bad_layouts_say_what_is_wrong(cls: type, text: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        cls.model_validate(spec_value(text))
    assert message in str(err.value)

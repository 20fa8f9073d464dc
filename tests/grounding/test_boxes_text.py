"""Box text <-> boxes for each declared format, KOSMOS-2's checked against transformers' own post-processing."""

from __future__ import annotations

import random

import pytest

from vlmspec.compiler.schema.boxes import CoordinateBoxes, PatchIndexBoxes
from vlmspec.runtime.grounding import Box, box_token_budget, format_box, iou, parse_boxes

kosmos = pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")

MINIGPT = CoordinateBoxes(format="{<{x1}><{y1}><{x2}><{y2}>}", scale=100)
QWEN = CoordinateBoxes(format="[{x1}, {y1}, {x2}, {y2}]", scale="pixels")
PATCH = PatchIndexBoxes(bins=32)


def test_kosmos2_strings_match_the_processor():
    """The processor's own example and random cell pairs: same boxes, same phrases, same order."""
    rng = random.Random(0)
    texts = ["<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
             " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."]
    for _ in range(50):
        a, b = rng.randrange(1024), rng.randrange(1024)
        a, b = min(a, b), max(a, b)
        c, d = rng.randrange(1024), rng.randrange(1024)
        texts.append(f"A<phrase> thing</phrase><object><patch_index_{a:04d}><patch_index_{b:04d}>"
                     f"</delimiter_of_multi_objects/><patch_index_{c:04d}><patch_index_{d:04d}></object> and "
                     f"<object><patch_index_{b:04d}><patch_index_{b:04d}></object>")
    w, h = 640, 480
    for text in texts:
        _, entities = kosmos.clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side=32)
        ref = [(name, bb) for name, _, bbs in entities for bb in bbs]
        ours = parse_boxes(text, PATCH, (w, h))
        assert len(ours) == len(ref)
        for box, (name, (x1, y1, x2, y2)) in zip(ours, ref, strict=True):
            assert box.corners == pytest.approx((x1 * w, y1 * h, x2 * w, y2 * h), abs=1e-9)
            if box.label is not None:
                assert box.label == name


def test_kosmos2_writes_the_processors_cells():
    """format_box picks the cells the processor's coordinate_to_patch_index picks."""
    rng = random.Random(1)
    w, h = 300, 200
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, 1) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, 1) for _ in range(2))
        if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
            continue
        a, b = kosmos.coordinate_to_patch_index((x1, y1, x2, y2), 32)
        text = format_box(Box("obj", x1 * w, y1 * h, x2 * w, y2 * h), PATCH, (w, h))
        assert text == f"<phrase>obj</phrase><object><patch_index_{a:04d}><patch_index_{b:04d}></object>"


def test_kosmos2_round_trip_is_within_a_cell():
    box = Box("dog", 64.0, 32.0, 400.0, 300.0)
    back = parse_boxes(format_box(box, PATCH, (640, 480)), PATCH, (640, 480))
    assert len(back) == 1 and back[0].label == "dog"
    assert all(abs(a - b) <= 640 / 32 for a, b in zip(back[0].corners, box.corners, strict=True))


def test_minigpt_round_trip_and_meaning():
    """scale = 100: integers 0..100 of the image's width and height."""
    w, h = 500, 250
    text = format_box(Box(None, 50, 25, 250, 200), MINIGPT, (w, h))
    assert text == "{<10><10><50><80>}"
    [box] = parse_boxes(f"[refer] the answer <p>red circle</p> {text}", MINIGPT, (w, h))
    assert box == Box("red circle", 50.0, 25.0, 250.0, 200.0)


def test_qwen_pixels_undo_the_resize():
    """scale = "pixels": numbers are pixels of the resized input; the box comes back in the original's."""
    [box] = parse_boxes('the cat is at [28, 56, 280, 112].', QWEN, (1000, 500), input_size=(560, 280))
    assert box.corners == pytest.approx((50.0, 100.0, 500.0, 200.0))
    assert format_box(box, QWEN, (1000, 500), input_size=(560, 280)) == "[28, 56, 280, 112]"


@pytest.mark.parametrize("text", [
    "{<10><20><30>", "{<10><20><30><", "<object><patch_index_0044></object>", "{<50><20><30><40>}",
    "{<-1><0><10><10>}", "{<1><2><3><400>}", "<object><patch_index_9999><patch_index_0001></object>", "",
])
def test_malformed_boxes_are_skipped(text):
    decl = PATCH if "patch" in text else MINIGPT
    assert parse_boxes(text, decl, (100, 100)) == []


def test_several_boxes_in_order():
    got = parse_boxes("{<0><0><10><10>} and {<50><50><100><100>}", MINIGPT, (200, 100))
    assert [b.corners for b in got] == [(0, 0, 20, 10), (100, 50, 200, 100)]


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0


@pytest.mark.parametrize("decl", [MINIGPT, QWEN, PATCH], ids=["minigpt", "qwen", "kosmos"])
def test_the_box_budget_holds_any_box_the_format_writes(decl):
    """`vlm train --eval` cuts held-out grounding answers at `box_token_budget`: every box of a 4000 x 3000 image,
    written in the format and tokenized byte by byte (the built-in tokenizer's worst case), fits in it."""
    from vlmspec.runtime.inputs.tokenizer import byte_tokenizer

    tok = byte_tokenizer(())
    budget = box_token_budget(decl, tok, margin=0)
    rng = random.Random(0)
    for _ in range(50):
        x1, y1 = rng.uniform(0, 2000), rng.uniform(0, 1500)
        box = Box(None, x1, y1, rng.uniform(x1 + 1, 4000), rng.uniform(y1 + 1, 3000))
        text = format_box(box, decl, (4000, 3000), (4000, 3000))
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= budget, (text, budget)

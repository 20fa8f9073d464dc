"""Images, datasets, the tokenizer and the processor: bad input is a one-line typed error or a counted bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.inputs.data import read_dataset
from vlmspec.runtime.inputs.images import ImageTransform, open_image
from vlmspec.runtime.inputs.processor import IGNORE, Processor
from vlmspec.runtime.inputs.synth import corpus, synthesize
from vlmspec.runtime.inputs.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([*corpus(), "USER: ASSISTANT: </s>"], 400)


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="image not found") as e:
        open_image(tmp_path / "missing.png")
    assert e.value.diagnostics[0].code == "E0501"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserInputError) as e:
        open_image(bad)
    assert e.value.diagnostics[0].code == "E0502"
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(UserInputError) as e:
        open_image(big, max_pixels=1000 * 1000)
    assert e.value.diagnostics[0].code == "E0503" and "3000x3000" in e.value.diagnostics[0].message


def test_transform_normalises(tmp_path: Path) -> None:
    img = Image.new("RGB", (50, 40), (255, 0, 0))
    t = ImageTransform(32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], "bilinear")(img)
    assert t.shape == (3, 32, 32)
    assert float(t[0].mean()) == pytest.approx(1.0) and float(t[1].mean()) == pytest.approx(-1.0)


def test_synth_is_deterministic_and_readable(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", n_train=20, n_test=4, size=32, seed=3)
    synthesize(tmp_path / "b", n_train=20, n_test=4, size=32, seed=3)
    assert a["train_conversations"] == 40
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    ds = read_dataset(tmp_path / "a" / "train.json")
    assert len(ds.samples) == 40 and not ds.bad
    caps = read_dataset(tmp_path / "a" / "captions.jsonl")
    assert len(caps.samples) == 20 and caps.samples[0].turns[0][1].startswith("a ")


def test_bad_records_are_counted_with_lines(tmp_path: Path) -> None:
    synthesize(tmp_path, n_train=3, n_test=1, size=32)
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    records = [
        {"image": "images/000000.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"image": "images/nope.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"image": "images/broken.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"image": "images/000001.png", "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    ds = read_dataset(path)
    assert len(ds.samples) == 1
    reasons = {b.where.rsplit(":", 1)[1]: b.reason for b in ds.bad}
    assert "image not found" in reasons["3"] and "unreadable image" in reasons["4"]
    assert "placeholder" in reasons["5"] and "needs one" in reasons["6"]
    ds.check(max_bad=4)
    with pytest.raises(UserInputError) as e:
        ds.check(max_bad=3)
    assert e.value.diagnostics[0].code == "E0520"
    assert "4 bad records" in e.value.diagnostics[0].message and "mixed.json:3" in e.value.diagnostics[0].message


def test_tokenizer_round_trip(tmp_path: Path, tokenizer) -> None:
    tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(UserInputError, match="no tokenizer") as e:
        load_tokenizer(tmp_path / "nothing")
    assert e.value.diagnostics[0].code == "E0510"


def test_processor_places_one_placeholder_per_visual_token(tokenizer) -> None:
    analysis, _ = load_analysis(TINY)
    p = Processor(analysis, tokenizer)
    enc = p.encode_example("What color is the shape?", "red")
    assert enc.input_ids.count(p.image_token_id) == analysis.shapes.out["prefix"].tokens == 64
    answer = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert p.decode(answer) == "red" and answer[-1] == tokenizer.eos_token_id
    batch = p.generation_batch(["What color is the shape?", "Which shape is in the image?"], None)
    assert batch["input_ids"].shape[0] == 2 and int(batch["attention_mask"][0, 0]) == 0  # left padding
    with pytest.raises(UserInputError) as e:
        p.encode_prompt("word " * 400)
    assert e.value.diagnostics[0].code == "E0504"

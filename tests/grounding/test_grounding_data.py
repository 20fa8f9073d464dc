"""Grounding training data: `vlm data synth --grounding` records carry the box in pixels, and a stage writes
`{box}` in the spec's declared format when it encodes them (so one data set trains any grounding model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.grounding import box_turns
from vlmspec.runtime.inputs.data import read_llava
from vlmspec.runtime.inputs.processor import Processor
from vlmspec.runtime.inputs.synth_grounding import grounding_corpus
from vlmspec.runtime.inputs.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MINIGPT = f"{ROOT}/specs/minigpt-v2-7b.vlm:minigpt_v2_7b_tiny"
LLAVA = f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny"


def processor(spec: str) -> Processor:
    analysis, _ = load_analysis(spec)
    extra = ["<image>", "<ImageHere>", *analysis.ir.settings.task_tokens]
    return Processor(analysis, train_tokenizer(grounding_corpus(), 300, extra))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("g") / "d"
    r = CliRunner().invoke(app, ["data", "synth", "--grounding", "-o", str(out), "--n", "12", "--test", "6",
                                 "--size", "48"])
    assert r.exit_code == 0, r.output
    assert "mean box accuracy" in r.output
    return out


def test_records_carry_pixel_boxes(synth: Path) -> None:
    train = json.loads((synth / "train_grounding.json").read_text())
    test = [json.loads(line) for line in (synth / "test_grounding.jsonl").read_text().splitlines()]
    assert len(train) == 12 and len(test) == 6
    assert train[0]["conversations"][0]["value"].startswith("<image>\n[refer] the ")
    assert train[0]["conversations"][1]["value"] == "{box}"
    for rec in train + test:
        x1, y1, x2, y2 = rec["box"]
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48
    assert len({tuple(r["box"]) for r in train}) > 6      # boxes vary: the picture must be read


def test_box_answer_is_written_in_the_spec_format(synth: Path) -> None:
    ds = read_llava(synth / "train_grounding.json", needs_image=True)
    assert not ds.bad and ds.samples[0].box is not None
    s = ds.samples[0]
    [(q, a)] = box_turns(s, processor(MINIGPT))
    x1, y1, x2, y2 = s.box
    assert q.startswith("[refer] the ")
    assert a == "{" + "".join(f"<{round(v * 100 / 48)}>" for v in (x1, y1, x2, y2)) + "}"


def test_box_record_for_a_model_without_boxes_is_refused(synth: Path) -> None:
    ds = read_llava(synth / "train_grounding.json", needs_image=True)
    with pytest.raises(UserInputError) as e:
        box_turns(ds.samples[0], processor(LLAVA))
    assert e.value.diagnostics[0].code == "E0629"


def test_malformed_box_is_a_bad_record(synth: Path, tmp_path: Path) -> None:
    recs = json.loads((synth / "train_grounding.json").read_text())[:2]
    recs[1]["box"] = [10, 10, 5, 5]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    ds = read_llava(tmp_path / "t.json", images=synth, needs_image=True)
    assert len(ds.samples) == 1 and "`box` must be" in ds.bad[0].reason

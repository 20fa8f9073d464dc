"""`packing`: rows of several samples give each sample exactly the loss and gradients it has alone.

For every way the runtime mixes images into text (prefix tokens at a fixed count, a bidirectional prefix,
native-size images with M-RoPE grids, any-resolution tiles, a visual expert, routed experts), the loss of a
micro-batch of samples of different lengths and image sizes packed into rows equals the unpacked loss
within 1e-5, and so do the gradients; through the trainer the first step's loss is the unpacked run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.decoding import segment_mask, segment_positions, segment_prefix
from vlmspec.runtime.inputs.data import read_dataset
from vlmspec.runtime.model import label_targets
from vlmspec.runtime.session import build_session
from vlmspec.runtime.train.packing import pack_rows, pack_stats, packed_batch, packed_layout
from vlmspec.runtime.train.stage_data import encode_dataset

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What colour is it?", "Which shape is drawn here, and where in the picture does it sit?",
             "Colour?", "Describe the shape in this image in a few words, please, as plainly as you can.",
             "Is it round?", "Where is it?"]
ANSWERS = ["blue", "a red square near the top left corner of the picture", "green", "a small circle", "no", "left"]
SIZES = [(48, 32), (32, 32), (24, 56), (64, 40), (40, 40), (16, 48)]
SPECS = {
    "prefix": "llava-1.5-7b.vlm:llava_1_5_7b_tiny",
    "bidirectional_prefix": "paligemma-3b.vlm:paligemma_3b_tiny",
    "mrope_native_sizes": "qwen2-vl-2b.vlm:qwen2_vl_2b_tiny",
    "anyres": "llava-v1.6-mistral-7b.vlm:llava_v1_6_mistral_7b_tiny",
    "visual_expert": "cogvlm-17b.vlm:cogvlm_17b_tiny",
    "moe": "moe-llava-phi2.vlm:moe_llava_phi2_tiny",
}


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    """Six samples of different text lengths and image sizes (non-square among them)."""
    root = tmp_path_factory.mktemp("varied")
    (root / "images").mkdir()
    records = []
    for i, ((w, h), q, a) in enumerate(zip(SIZES, QUESTIONS, ANSWERS, strict=True)):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def _loss(model, batch: dict) -> torch.Tensor:
    labels = batch.pop("labels")
    out = model(**batch, labels=labels, logits_for="labels")
    _, targets = label_targets(labels)
    loss = F.cross_entropy(out.logits.float(), targets, reduction="sum") / targets.numel()
    return loss + (out.aux_loss if out.aux_loss is not None else 0)


def _loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = _loss(model, dict(batch))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(SPECS))
def test_packed_rows_give_the_unpacked_loss_and_gradients(case: str, varied: Path) -> None:
    spec, name = SPECS[case].split(":")
    analysis, _ = load_analysis(f"{ROOT}/specs/{spec}:{name}")
    torch.manual_seed(0)
    session = build_session(analysis, seed=0)
    model, processor = session.model, session.require_processor()
    model.train()
    for m in model.modules():  # dropout would draw different masks for the two layouts
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    enc = encode_dataset(read_dataset(str(varied), "auto", None, needs_image=True, image_token="<image>"), processor)
    examples = enc.examples
    items = [enc.pixels[k] for k in range(len(examples))]
    assert len({len(e.input_ids) for e in examples}) > 2  # lengths really differ

    plain = processor.training_batch(examples, *processor.stack(items))
    # rows twice the longest sample: native-size images make a few samples far longer than the rest
    rows, reading = packed_layout(examples, 2 * max(len(e.input_ids) for e in examples), model.llm.c.max_positions)
    assert len(rows) < len(examples)  # something was packed
    packed = packed_batch(processor, examples, rows, *processor.stack([items[k] for k in reading]))
    assert packed["input_ids"].numel() < plain["input_ids"].numel()

    loss0, g0 = _loss_and_grads(model, plain)
    loss1, g1 = _loss_and_grads(model, packed)
    assert loss1 == pytest.approx(loss0, abs=1e-5)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4), k


def test_packing_without_the_mask_would_differ(varied: Path) -> None:
    """The equality above is not an accident of short rows: the same packed rows read without their
    segments (one causal sequence per row) give another loss."""
    analysis, _ = load_analysis(f"{ROOT}/specs/llava-1.5-7b.vlm:llava_1_5_7b_tiny")
    session = build_session(analysis, seed=0)
    model, processor = session.model, session.require_processor()
    model.eval()
    enc = encode_dataset(read_dataset(str(varied), "auto", None, needs_image=True, image_token="<image>"), processor)
    items = [enc.pixels[k] for k in range(len(enc.examples))]
    rows, reading = packed_layout(enc.examples, True)
    batch = packed_batch(processor, enc.examples, rows, *processor.stack([items[k] for k in reading]))
    with torch.no_grad():
        packed = float(_loss(model, dict(batch)))
        leaky = dict(batch)
        leaky.pop("segment_ids")
        # without segments the model splices per row, which a packed row's image count refuses; give the
        # features directly so only the mask and the positions differ
        feats = model.encode_images(leaky.pop("pixel_values"))
        seg = batch["segment_ids"]
        leaky_loss = float(_loss(model, {**leaky, "image_features": feats, "segment_ids": (seg > 0).long()}))
    assert abs(packed - leaky_loss) > 1e-3


def test_pack_rows_first_fit_decreasing() -> None:
    assert pack_rows([5, 3, 2, 4, 1], 6) == [[0, 4], [3, 2], [1]]
    assert pack_rows([9, 2], 4) == [[0], [1]]  # a longer sample gets a row of its own
    assert sorted(k for r in pack_rows([3] * 7, 10) for k in r) == list(range(7))


def test_segment_mask_positions_and_prefix() -> None:
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = segment_mask(seg)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # sample 2 reads itself only
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding reads itself: no empty softmax row
    labels = torch.tensor([[-100, -100, 7, -100, 8, -100]])
    prefix = segment_prefix(labels, seg)
    assert prefix.tolist() == [[True, True, False, True, False, False]]
    both = segment_mask(seg, prefix)[0, 0]
    assert both[0, 1] and not both[0, 3]  # a prefix reads its own sample's prefix, never the next sample's


def test_pack_stats_count_padding() -> None:
    from vlmspec.runtime.inputs.processor import Encoded

    examples = [Encoded(list(range(n))) for n in (6, 2, 4)]
    stats = pack_stats(examples, [[0], [2, 1]])
    assert (stats.real, stats.packed, stats.unpacked, stats.rows) == (12, 12, 18, 2)
    assert stats.padding == 0 and stats.unpacked_padding == pytest.approx(1 / 3)


SPEC = """
model tiny {{
  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 48  depth = 2  heads = 4  ffn = 96  vocab = 400  max_positions = 128 }}
  fusion prefix(proj -> llm)
  stage s {{ train proj, llm  freeze clip  batch 6  steps 2  {extra} }}
}}
"""


def test_trainer_packs_to_the_same_first_loss(varied: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    losses, outputs = {}, {}
    for label, extra in (("plain", ""), ("packed", "packing = true")):
        spec = tmp_path / f"{label}.vlm"
        spec.write_text(SPEC.format(extra=extra))
        run = tmp_path / label
        r = runner.invoke(app, ["train", str(spec), "--data", str(varied), "-o", str(run), "--workers", "0"])
        assert r.exit_code == 0, r.output
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[label] = [m["loss"] for m in metrics]
        outputs[label] = (r.output, metrics)
    assert losses["packed"][0] == pytest.approx(losses["plain"][0], abs=1e-5)
    assert losses["packed"][1] == pytest.approx(losses["plain"][1], abs=1e-4)
    out, metrics = outputs["packed"]
    assert "packing: 12 samples in" in out and "padding" in out
    assert all(0 <= m["padding"] < 1 for m in metrics)
    assert "padding" not in outputs["plain"][1][0]

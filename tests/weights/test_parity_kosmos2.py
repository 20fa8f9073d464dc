"""Kosmos-2: import a tiny `Kosmos2ForConditionalGeneration` (CLIP tower, latent-query projection, Kosmos-2's
sub-LN decoder with sinusoidal positions) with every parameter randomised and compare with transformers on a
non-square image read through Kosmos2Processor: logits within 1e-4 (fp32), 16 greedy tokens identical (KV
cache), the image seen; the CLI path import -> build -> generate; the export back, bit for bit, which
transformers loads."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, assert_sees_image, imported, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

QUESTION = "An image of"
NEW = 16
GRID = 4  # image_size 32 / patch_size 8: 16 patch-index tokens
WORDS = ["▁An", "▁image", "▁of", "▁a", "▁the", "▁red", "▁square", "▁circle", "▁blue"]
TAGS = ["</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>", "<object>", "</object>",
        "</delimiter_of_multi_objects/>", "<grounding>"]


def tokenizer_and_processor(out: Path):
    """An XLM-R (Unigram) tokenizer of single characters and a few words, and Kosmos2Processor over it (which
    adds Kosmos-2's tag and `<patch_index_NNNN>` tokens), saved to `out`."""
    chars = [c for c in string.ascii_letters + string.digits + ".,?!"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w, -1.0) for w in WORDS] + [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    vocab += [("▁", -3.0), ("<mask>", 0.0)]
    tok = transformers.XLMRobertaTokenizer(vocab=vocab)
    ip = transformers.CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                         crop_size={"height": 32, "width": 32})
    proc = transformers.Kosmos2Processor(ip, tok, num_patch_index_tokens=GRID * GRID)
    proc.save_pretrained(str(out))
    return proc


def kosmos2(out: Path, seed: int = 0, tie: bool = True):
    _quiet(transformers)
    proc = tokenizer_and_processor(out)
    tok = proc.tokenizer
    cfg = transformers.Kosmos2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(tok), embed_dim=48, layers=2, ffn_dim=96, attention_heads=4,
                         max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=tie),
        latent_query_num=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.Kosmos2ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wider than the 0.02 init: logits that vary, greedy answers that are not one token
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    randomise(m, fresh=("latent_query",), seed=seed)
    m.save_pretrained(str(out))
    return m, proc


def reference(proc, image: Path, text: str = QUESTION):
    from PIL import Image

    return proc(images=Image.open(image), text="<grounding>" + text, return_tensors="pt")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_kosmos2_parity(tmp_path, tie):
    """Tied (as published) and untied heads; a tied random head keeps answering the last token, so the untied
    one is what shows the cache over answers that vary."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    hf, proc = kosmos2(tmp_path / "hf", tie=tie)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and set(mapping["components"]) == {"clip", "proj", "llm"}
    assert all(c.status in ("loaded", "no tensors") for c in report.components.values()), report
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    image = noise_image(tmp_path / "img.png", (45, 29), colour=True)
    ref = reference(proc, image)

    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    ours_proc = Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))
    batch = ours_proc.generation_batch([QUESTION], [image])
    # the same ids but at the placeholders (ours: `<unk>` x 64; Kosmos2Processor: unk + 1 ... unk + 64)
    placeholder = ref["image_embeds_position_mask"].bool()
    unk = proc.tokenizer.unk_token_id
    assert batch["input_ids"][~placeholder].tolist() == ref["input_ids"][~placeholder].tolist()
    assert (batch["input_ids"][placeholder] == unk).all()
    assert (batch["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6

    kw = dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
              image_embeds_position_mask=ref["image_embeds_position_mask"])
    assert_sees_image(lambda p: hf(pixel_values=p, **kw).logits, ref["pixel_values"])
    with torch.no_grad():
        want = hf(pixel_values=ref["pixel_values"], **kw).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    diff = float((want - got).abs().max())
    assert diff <= 1e-4, diff
    with torch.no_grad():
        want_ids = hf.generate(pixel_values=ref["pixel_values"], **kw, max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, use_cache=True)
    want_ids = want_ids[:, -NEW:]
    got_ids = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], max_new_tokens=NEW)
    assert got_ids.tolist() == want_ids.tolist()
    if not tie:
        assert len(set(want_ids[0].tolist())) > 4, want_ids


def test_kosmos2_cli_import_build_generate(tmp_path):
    """`vlm import-hf` -> `vlm build` -> `vlm generate` answers with what Kosmos2Processor + generate give."""
    from typer.testing import CliRunner

    from vlmspec.cli import app

    hf, proc = kosmos2(tmp_path / "hf", tie=False)  # an answer that varies (see test_kosmos2_parity)
    image = noise_image(tmp_path / "img.png", (45, 29), colour=True)
    runner = CliRunner()
    spec = tmp_path / "imported.vlm"
    for args in (["import-hf", str(tmp_path / "hf"), "-o", str(spec)], ["check", str(spec)],
                 ["fmt", "--check", str(spec)], ["build", str(spec), "-o", str(tmp_path / "built")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    assert f"boxes = patch_index(bins = {GRID})" in spec.read_text()  # the processor's grid, for --boxes
    r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    ref = reference(proc, image)
    with torch.no_grad():
        want = hf.generate(**ref, max_new_tokens=NEW, do_sample=False)[0, ref["input_ids"].shape[1]:]
    words = [t for t in want.tolist() if t != proc.tokenizer.eos_token_id]
    answer = proc.tokenizer.decode(words, skip_special_tokens=True).strip()
    assert answer and r.stdout.strip() == answer


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_kosmos2_export_round_trip(tmp_path, tie):
    """`vlm export-hf` writes the checkpoint's tensors back bit for bit, and transformers loads the export
    (model and processor) into the same logits."""
    from hf_tiny import export_round_trip

    hf, proc = kosmos2(tmp_path / "hf", tie=tie)
    _, back = export_round_trip(tmp_path / "hf", tmp_path)
    again = transformers.Kosmos2ForConditionalGeneration.from_pretrained(str(back)).eval()
    again_proc = transformers.Kosmos2Processor.from_pretrained(str(back))
    image = noise_image(tmp_path / "img.png", (45, 29))
    ref, mine = reference(proc, image), reference(again_proc, image)
    assert mine["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(mine["pixel_values"], ref["pixel_values"])
    with torch.no_grad():
        a, b = hf(**ref).logits, again(**mine).logits
    assert (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize(("over", "message"), [
    ({"text_config": {"add_cross_attention": True}}, "cross-attention"),
    ({"text_config": {"activation_function": "mish"}}, "text activation mish"),
    ({"vision_config": {"num_channels": 4}}, "4 image channels"),
    ({"vision_config": {"image_size": [32, 48]}}, "non-square vision tower"),
])
def test_kosmos2_import_refusals(tmp_path, over, message):
    """What a spec cannot hold of a Kosmos-2 config is one E0585 line naming it."""
    from hf_tiny import refusal

    d = refusal(tmp_path / "hf", {"model_type": "kosmos-2", **over})
    assert d.code == "E0585" and message in d.message, d.message


def test_kosmos2_batch_matches_one_by_one(tmp_path):
    """Two prompts of different lengths in one left-padded batch: each row's positions start after its
    padding, as Kosmos2Processor + generate place them, so each row answers as it does alone."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    kosmos2(tmp_path / "hf", tie=False)
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    proc = Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))
    images = [noise_image(tmp_path / "a.png", (45, 29)), noise_image(tmp_path / "b.png", (20, 33), colour=True)]
    qs = [QUESTION, "a red square of the blue circle"]
    keys = ("input_ids", "attention_mask", "pixel_values")
    batch = proc.generation_batch(qs, images)
    assert int((batch["attention_mask"] == 0).sum()) > 0
    both = ours.generate(**{k: batch[k] for k in keys}, max_new_tokens=8)
    for i in range(2):
        one = proc.generation_batch([qs[i]], [images[i]])
        assert torch.equal(both[i], ours.generate(**{k: one[k] for k in keys}, max_new_tokens=8)[0])


@pytest.mark.parametrize("targets", ["", ", targets = [attn.q, attn.k, attn.v, attn.o, mlp.fc1, mlp.fc2]"])
def test_kosmos2_lora_adds_what_the_compiler_counts(tmp_path, targets):
    """`lora llm(...)` on a kosmos2 wraps its projections and FFN and adds as many parameters as the plan says."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.lora import inject_lora, lora_parameters

    root = Path(__file__).resolve().parents[2]
    text = (root / "specs" / "kosmos-2.vlm").read_text()
    text += ("model lora_tiny extends kosmos_2_tiny {\n"
             f"  stage ground {{ train proj  freeze clip  lora llm(rank = 4{targets})  precision fp32 }}\n}}\n")
    (tmp_path / "k.vlm").write_text(text)
    analysis = load_analysis(f"{tmp_path / 'k.vlm'}:lora_tiny")[0]
    model = build_model(analysis)
    inject_lora(model, analysis, analysis.ir.stages[0])
    added = sum(p.numel() for p in lora_parameters(model))
    assert added == analysis.plans[0].lora_params > 0

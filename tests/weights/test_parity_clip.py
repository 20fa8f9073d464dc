"""`CLIPModel` and `SiglipModel` through `vlm import-hf`: every parameter randomised, the imported spec's
image-text logits equal transformers' `logits_per_image` within 1e-5 (fp32) on a non-square image batch
(2 images, each resized as the folder's processor does) against 3 captions tokenized by the folder's
tokenizer, and they depend on the image; `vlm import-hf -> vlm build -> vlm export-hf` gives the checkpoint's
tensors back bit for bit, and transformers loads the export to the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, assert_sees_image, imported, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-5
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "square", "circle", "the"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CAPTIONS = ["a photo of a cat", "the red square", "a blue circle of the dog"]
SIZES = ((53, 37), (29, 45))  # (w, h): one wide, one tall


def tokenizer(out: Path, kind: str):
    """A word-level tokenizer: CLIP's adds BOS and EOS (the vocabulary's last id) and pads with EOS; SigLIP's
    adds EOS and pads to max_length, as SiglipProcessor's captions are."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<unk>", BOS] if kind == "clip" else ["<pad>", "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*specials, EOS]])
    if kind == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                                    unk_token="<unk>", pad_token=EOS, model_max_length=16)
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>",
                                                    pad_token="<pad>", model_max_length=16)
    fast.save_pretrained(str(out))
    return fast, len(vocab)


def reference(out: Path, kind: str):
    """A tiny CLIPModel / SiglipModel with its tokenizer and image processor, randomised and saved."""
    _quiet(transformers)
    tok, vocab = tokenizer(out, kind)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config={**text, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1,
                                                   "bos_token_id": 2},
                                      vision_config=vision, projection_dim=24)
        model = transformers.CLIPModel(cfg).eval()
        proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        cfg = transformers.SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=vision)
        model = transformers.SiglipModel(cfg).eval()
        proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    randomise(model, fresh=("probe",))
    model.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    return model, tok, proc


def batch(tmp: Path, tok, proc, kind: str):
    from PIL import Image

    images = [Image.open(noise_image(tmp / f"{w}x{h}.png", (w, h), colour=True)) for w, h in SIZES]
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    enc = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    return images, px, enc["input_ids"], enc["attention_mask"] if kind == "clip" else None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_imported_towers_match_transformers(tmp_path: Path, kind: str) -> None:
    """Through `import_hf` + `build_with_weights`: each tower's pooled output equals transformers' (the image
    tower on the processor's pixels of two non-square images) and our preprocessing equals the processor."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.encoder_images import transform_for

    hf, tok, proc = reference(tmp_path / "hf", kind)
    model, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report.summary()
    assert "feature = pooled" in mapping["spec"] and f"text txt = {kind}_text" in mapping["spec"]
    images, px, ids, mask = batch(tmp_path, tok, proc, kind)
    with torch.no_grad():
        got_v, want_v = model.components["img"](px).x[:, 0], hf.vision_model(pixel_values=px).pooler_output
        got_t = model.components["txt"](ids, mask)
        want_t = hf.text_model(input_ids=ids, attention_mask=mask).pooler_output
    assert float((got_v - want_v).abs().max()) < TOL
    assert float((got_t - want_t).abs().max()) < TOL
    analysis = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")[0]
    ours = torch.stack([transform_for(analysis.ir.components["img"].config)(im) for im in images])
    assert float((ours - px).abs().max()) < TOL


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_imported_logits_match_transformers(tmp_path: Path, kind: str) -> None:
    hf, tok, proc = reference(tmp_path / "hf", kind)
    model, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report.summary()
    _, px, ids, mask = batch(tmp_path, tok, proc, kind)
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
        got = model.logits(px, ids, mask)
    assert got.shape == (2, 3)
    diff = float((got - want).abs().max())
    assert diff < TOL, diff

    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        return hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image

    assert_sees_image(logits_of, px, tol=TOL)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_captions_are_the_folder_tokenizers(tmp_path: Path, kind: str) -> None:
    """The session's tokenizer is the folder's, and the contrastive processor lays captions out as it does."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.session import build_session

    _, tok, proc = reference(tmp_path / "hf", kind)
    from vlmspec.runtime.weights import import_hf

    text, mapping = import_hf(tmp_path / "hf")
    (tmp_path / "m.vlm").write_text(text)
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:{mapping['model']}")[0]
    session = build_session(analysis)
    ids, mask = session.processor.captions(CAPTIONS)
    want = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    assert ids.tolist() == want["input_ids"].tolist()
    assert mask.tolist() == want["attention_mask"].tolist()


def test_siglip_logits_through_the_imported_spec(tmp_path: Path) -> None:
    """SigLIP has no projections: the spec's `temperature = exp(-logit_scale)` and `bias` give the head the
    checkpoint's learned scale and bias bit for bit, and with the imported towers the logits equal
    transformers' `logits_per_image` (and move with the image)."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.contrastive import build_contrastive

    hf, tok, proc = reference(tmp_path / "hf", "siglip")
    model, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report.summary()
    analysis = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")[0]
    head = build_contrastive(analysis).contrastive  # the head as the spec's values set it
    assert torch.equal(head.logit_scale.detach().reshape(1), hf.logit_scale.detach().reshape(1))
    assert torch.equal(head.logit_bias.detach().reshape(1), hf.logit_bias.detach().reshape(1))
    _, px, ids, _ = batch(tmp_path, tok, proc, "siglip")
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids).logits_per_image
        got = head.logits(model.image_embeds(px), model.text_embeds(ids))
    assert got.shape == (2, 3)
    assert float((got - want).abs().max()) < TOL
    assert_sees_image(lambda p: hf(pixel_values=p, input_ids=ids).logits_per_image, px, tol=TOL)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_round_trip(tmp_path: Path, kind: str) -> None:
    """`vlm import-hf` -> `vlm build` (CLI) -> `export_hf`: the towers' tensors come back bit for bit under the
    checkpoint's keys, every key is there in its shape, and transformers loads the folder (its towers then
    give the original's pooled outputs), head included."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.weights.export import export_hf

    hf, tok, proc = reference(tmp_path / "hf", kind)
    runner = CliRunner()
    for args in (["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "i.vlm")],
                 ["build", str(tmp_path / "i.vlm"), "-o", str(tmp_path / "built")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    back = export_hf(tmp_path / "built", tmp_path / "back")
    ours, theirs = load_file(str(back / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    towers = [k for k in theirs if k.startswith(("vision_model.", "text_model."))]
    head = [k for k in theirs if k not in towers]
    differ = [k for k in towers + head if not torch.equal(ours[k], theirs[k])]
    assert not differ, differ[:5]
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    again = cls.from_pretrained(str(back)).eval()
    assert type(transformers.AutoImageProcessor.from_pretrained(str(back))) is type(proc)
    _, px, ids, mask = batch(tmp_path, tok, proc, kind)
    with torch.no_grad():
        for tower, args in (("vision_model", {"pixel_values": px}),
                            ("text_model", {"input_ids": ids, "attention_mask": mask})):
            a, b = getattr(again, tower)(**args).pooler_output, getattr(hf, tower)(**args).pooler_output
            assert torch.equal(a, b), tower


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_head_layout_gives_transformers_logits(tmp_path: Path, kind: str) -> None:
    """The format's `head` part maps the checkpoint's projections, scale and bias onto the contrastive head
    (read here through the format's own layout, as the loader does for the fusion's `weights`): with
    the imported towers, `logits_per_image` within 1e-5 on two non-square images x three captions, and
    the logits move with the image."""
    from vlmspec.runtime.weights.formats import formats
    from vlmspec.runtime.weights.source import CheckpointSource

    hf, tok, proc = reference(tmp_path / "hf", kind)
    model, report, mapping = imported(tmp_path / "hf", tmp_path)
    (layout,) = formats()[kind].family.parts["head"].layouts
    source = CheckpointSource(tmp_path / "hf")
    head = model.contrastive
    state = {}
    for key, ours in head.state_dict().items():
        ck = layout.to_checkpoint(key)
        assert ck is not None and ck in source, key
        assert layout.shape(key, source.shape(ck)) == tuple(ours.shape), key
        state[key] = layout.convert(key, source.get(ck))
    assert sorted(k for k in source.keys() if layout.owns(k)) == sorted(layout.to_checkpoint(k) for k in state)
    head.load_state_dict(state)
    _, px, ids, mask = batch(tmp_path, tok, proc, kind)
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
        got = model.logits(px, ids, mask)
    assert got.shape == (2, 3)
    assert float((got - want).abs().max()) < TOL
    assert_sees_image(lambda p: hf(pixel_values=p, input_ids=ids, attention_mask=mask).logits_per_image, px, tol=TOL)
    # and back: the head's tensors under the checkpoint's keys, in its shapes
    for key, tensor in head.state_dict().items():
        assert torch.equal(layout.unconvert(key, tensor), source.get(layout.to_checkpoint(key)))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_training_continues_the_checkpoint_with_its_own_loss(tmp_path: Path, kind: str) -> None:
    """Continued pre-training from an imported checkpoint: `vlm train` on the imported spec plus one contrastive
    stage (batch = the whole set of 6 non-square image-caption pairs, so the data order cannot matter: the
    loss is symmetric in the pairs) logs, at its first step, the loss transformers' `CLIPModel` / `SiglipModel`
    compute with `return_loss=True` on the same pairs through the folder's processor, within 1e-5. Every
    tower, projection, scale and bias is the checkpoint's, and the objective is the published one."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.weights import import_hf

    hf, tok, proc = reference(tmp_path / "hf", kind)
    data = tmp_path / "data"
    data.mkdir()
    captions = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 3)) for i in range(6)]
    records = []
    for i, text in enumerate(captions):
        noise_image(data / f"{i}.png", (30 + 7 * i, 52 - 5 * i), colour=True)
        records.append({"image": f"{i}.png", "caption": text})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text, mapping = import_hf(tmp_path / "hf")
    stage = ('  stage more {\n    train img, txt, fusion\n    objective contrastive\n'
             '    data captions("captions.jsonl")\n    optim adamw(lr = 1e-6)\n    batch 6\n    steps 1\n  }\n')
    spec = tmp_path / "more.vlm"
    spec.write_text(text.rstrip()[:-1] + stage + "}\n")
    r = CliRunner().invoke(app, ["train", f"{spec}:{mapping['model']}", "--data", str(data), "-o",
                                 str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    ours = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["contrastive"]
    images = [Image.open(data / f"{i}.png") for i in range(6)]
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    enc = tok(captions, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  return_loss=True).loss
    assert abs(ours - float(want)) < TOL, (ours, float(want))

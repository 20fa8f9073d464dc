"""Fuyu: import a tiny `FuyuForCausalLM` (Persimmon decoder, raw patches through one linear layer) and compare
with transformers on a non-square image: logits within 1e-4 (fp32), 16 greedy tokens identical, the patches
and prompt ids as FuyuImageProcessor / FuyuProcessor lay them out, and the CLI path import -> build ->
generate. FuyuProcessor itself needs a SentencePiece-like tokenizer (it drops the first id of the placeholder
text), so the reference ids are written out as it writes them: each row's `|SPEAKER|`s and `|NEWLINE|`,
`<s>`, the text's ids, `<0x04>`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, imported, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

PATCH, CANVAS = 4, (24, 32)
WORDS = ["what", "is", "in", "the", "picture", "red", "square", "a", "circle", "blue"]
SPECIALS = ["<unk>", "<s>", "|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|", "<0x04>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
SPEAKER, NEWLINE, BOS, BOA = VOCAB["|SPEAKER|"], VOCAB["|NEWLINE|"], VOCAB["<s>"], VOCAB["<0x04>"]
N_VOCAB = 96


def image_processor():
    """FuyuImageProcessor at the tiny canvas and patch: the PIL backend, which resizes as vlmspec does (PIL on
    8-bit images), so even a scaled-down image's patches agree bit for bit."""
    cls = getattr(transformers, "FuyuImageProcessorPil", None) or transformers.FuyuImageProcessor
    return cls(size={"height": CANVAS[0], "width": CANVAS[1]}, patch_size={"height": PATCH, "width": PATCH})


def tokenizer(out: Path):
    """A word-level tokenizer holding Fuyu's special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="|ENDOFTEXT|",
                                                unk_token="<unk>", pad_token="<unk>")
    fast.save_pretrained(str(out))
    return fast


def fuyu(out: Path, *, qk_norm: bool = True, seed: int = 0):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.FuyuConfig(
        text_config=dict(model_type="persimmon", vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                         qk_layernorm=qk_norm, layer_norm_eps=1e-5, hidden_act="relu2",
                         rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                          "partial_rotary_factor": 0.5}, bos_token_id=BOS, eos_token_id=2),
        patch_size=PATCH, num_channels=3, image_token_id=SPEAKER)
    torch.manual_seed(seed)
    m = transformers.FuyuForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wider than the 0.02 init: logits that vary, greedy answers that are not one token
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    tokenizer(out)
    ip = image_processor()
    ip.save_pretrained(str(out))
    return m, ip


def hf_patches(ip, image) -> tuple[torch.Tensor, int, int]:
    """(patches [n x 3*p*p], rows, cols) as FuyuProcessor cuts one image: the processor's canvas cropped to
    whole patches around the (fitted) image, patchified."""
    from PIL import Image

    out = ip(images=[Image.open(image)], return_tensors="pt")
    img = out["images"][0]
    img = img[0] if img.dim() == 4 else img
    h = min(img.shape[-2], math.ceil(int(out["image_unpadded_heights"][0][0]) / PATCH) * PATCH)
    w = min(img.shape[-1], math.ceil(int(out["image_unpadded_widths"][0][0]) / PATCH) * PATCH)
    px = torch.as_tensor(ip.patchify_image(torch.as_tensor(img)[None, :, :h, :w].numpy())).squeeze(0)
    return px.float(), h // PATCH, w // PATCH


def reference_ids(rows: int, cols: int, text: str) -> torch.Tensor:
    """FuyuProcessor's layout: each row's placeholders and a newline, `<s>`, the text, `<0x04>`."""
    image = ([SPEAKER] * cols + [NEWLINE]) * rows
    return torch.tensor([image + [BOS] + [VOCAB[w] for w in text.split()] + [BOA]])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_fuyu_parity(tmp_path, qk_norm):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    hf, ip = fuyu(tmp_path / "hf", qk_norm=qk_norm)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), report
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    image = noise_image(tmp_path / "img.png", (18, 13), colour=True)  # w x h: 5 x 4 patches, both partial
    question = "what is in the picture"

    # our processor against FuyuImageProcessor + FuyuProcessor's layout
    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    proc = Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))
    batch = proc.generation_batch([question], [image])
    ref_px, rows, cols = hf_patches(ip, image)
    assert (rows, cols) == (4, 5)
    ids = reference_ids(rows, cols, question)
    assert batch["input_ids"].tolist() == ids.tolist()
    ours_px = batch["pixel_values"][0, : rows * cols].permute(0, 2, 3, 1).reshape(rows * cols, -1)
    assert (ours_px - ref_px).abs().max() <= 1e-6
    assert batch["image_sizes"].tolist() == [[13, 18]]

    mask = torch.ones_like(ids)
    px = ref_px[None]
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p).logits, px)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        out = ours(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                   image_sizes=batch["image_sizes"]).logits
    assert (ref - out).abs().max() <= 1e-4
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
                           suppress_tokens=[SPEAKER])[:, ids.shape[1]:]
    got = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], max_new_tokens=16)
    assert torch.equal(got, want)


def test_fuyu_batch_of_sizes_matches_one_by_one(tmp_path):
    """Two images of different sizes in one left-padded batch give each row what it gives alone."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    fuyu(tmp_path / "hf")
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    proc = Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))
    images = [noise_image(tmp_path / "a.png", (18, 13)), noise_image(tmp_path / "b.png", (9, 22), colour=True)]
    qs = ["what is in the picture", "a red square"]
    batch = proc.generation_batch(qs, images)
    both = ours.generate(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")},
                         max_new_tokens=8)
    for i in range(2):
        one = proc.generation_batch([qs[i]], [images[i]])
        alone = ours.generate(**{k: one[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")},
                              max_new_tokens=8)
        assert torch.equal(both[i], alone[0])


def test_fuyu_resized_image_patches(tmp_path):
    """An image larger than the canvas is scaled down as FuyuImageProcessor scales it: the same patch grid
    and the same patches."""
    from vlmspec.compiler.schema.patches import Patches, PatchRows
    from vlmspec.runtime.inputs.tiling import PatchRowsTransform

    ip = image_processor()
    transform = PatchRowsTransform(Patches(patch_size=PATCH, layout=PatchRows(canvas=CANVAS)))
    for w, h in [(90, 31), (31, 90), (64, 48), (33, 25)]:
        image = noise_image(tmp_path / f"{w}x{h}.png", (w, h), colour=True)
        px, rows, cols = hf_patches(ip, image)
        item = transform(image)
        assert item.grid == transform.layout.grid(h, w, PATCH) == (rows, cols), (w, h)
        assert (item.pixels.permute(0, 2, 3, 1).reshape(rows * cols, -1) - px).abs().max() <= 1e-6, (w, h)


def test_fuyu_cli_import_build_generate(tmp_path):
    """`vlm import-hf` -> `vlm build` -> `vlm generate` answers with the reference's greedy tokens."""
    from typer.testing import CliRunner

    from vlmspec.cli import app

    hf, ip = fuyu(tmp_path / "hf")
    image = noise_image(tmp_path / "img.png", (18, 13), colour=True)
    runner = CliRunner()
    spec = tmp_path / "imported.vlm"
    for args in (["import-hf", str(tmp_path / "hf"), "-o", str(spec)], ["check", str(spec)],
                 ["build", str(spec), "-o", str(tmp_path / "built")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", str(image), "--prompt", "a red square",
                            "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    px, rows, cols = hf_patches(ip, image)
    ids = reference_ids(rows, cols, "a red square")
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[None],
                           max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2,
                           suppress_tokens=[SPEAKER])[0, ids.shape[1]:]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    words = [t for t in want.tolist() if t != 2]
    assert r.stdout.strip() == tok.decode(words, skip_special_tokens=True).strip()


def test_fuyu_export_round_trip(tmp_path):
    """`vlm export-hf` writes a Fuyu folder that transformers loads into the same logits."""
    from hf_tiny import export_round_trip

    hf, ip = fuyu(tmp_path / "hf")
    _, back = export_round_trip(tmp_path / "hf", tmp_path)
    again = transformers.FuyuForCausalLM.from_pretrained(str(back)).eval()
    image = noise_image(tmp_path / "img.png", (18, 13))
    px, rows, cols = hf_patches(ip, image)
    ids = reference_ids(rows, cols, "a red square")
    with torch.no_grad():
        a = hf(input_ids=ids, pixel_values=px[None]).logits
        b = again(input_ids=ids, pixel_values=px[None]).logits
    assert (a - b).abs().max() <= 1e-6
    proc = transformers.FuyuProcessor.from_pretrained(str(back))  # the exported processor cuts images alike
    again_px, again_rows, again_cols = hf_patches(proc.image_processor, image)
    assert (again_rows, again_cols) == (rows, cols) and torch.equal(again_px, px)
    assert proc.image_token_id == SPEAKER and proc.image_newline_id == NEWLINE


@pytest.mark.parametrize(("over", "message"), [
    ({"text_config": {"model_type": "llama"}}, "Persimmon only"),
    ({"text_config": {"model_type": "persimmon", "hidden_act": "silu"}}, "Persimmon activation silu"),
    ({"num_channels": 4}, "4 image channels"),
    ({"image_token_id": 10**6}, "outside the vocabulary"),
])
def test_fuyu_import_refusals(tmp_path, over, message):
    """What a spec cannot hold of a Fuyu config is one E0585 line naming it."""
    from hf_tiny import refusal

    d = refusal(tmp_path / "hf", {"model_type": "fuyu", "patch_size": 30, "image_token_id": 71011, **over})
    assert d.code == "E0585" and message in d.message, d.message


def test_fuyu_processor_refusal(tmp_path):
    """A canvas that is not whole patches cannot be imported; a tokenizer without `|NEWLINE|` neither."""
    from tokenizers import Tokenizer, models

    from vlmspec.diagnostics import SpecValidationError, UserInputError
    from vlmspec.runtime.weights import import_hf

    fuyu(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "FuyuImageProcessor", "size": {"height": 24, "width": 30},
         "patch_size": {"height": PATCH, "width": PATCH}}))
    text, mapping = import_hf(tmp_path / "hf")  # imported as the folder says, then refused by the checker
    from vlmspec.compiler.compile import load_analysis

    (tmp_path / "a.vlm").write_text(text)
    with pytest.raises(SpecValidationError) as e:
        load_analysis(f"{tmp_path / 'a.vlm'}:{mapping['model']}")
    assert "error[E0250]" in str(e.value)
    words = {t: i for i, t in enumerate(["<unk>", "<s>", "|SPEAKER|"])}
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                                bos_token="<s>", unk_token="<unk>")
    bare.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserInputError) as e:
        import_hf(tmp_path / "hf")
    assert e.value.diagnostics[0].code == "E0585" and "|NEWLINE|" in e.value.diagnostics[0].message


def test_fuyu_patches_refuse_other_pixels(tmp_path):
    """Pixels that are not the processor's patches (a plain image batch) are one E0546 line."""
    from vlmspec.diagnostics import UserInputError

    fuyu(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    with pytest.raises(UserInputError) as e:
        ours.components["img"](torch.zeros(2, 3, 24, 32))
    assert e.value.diagnostics[0].code == "E0546"


def test_fuyu_export_refuses_another_prompt(tmp_path):
    """A Fuyu-shaped spec whose prompt FuyuProcessor cannot lay out is refused in one E0586 line."""
    from typer.testing import CliRunner

    from vlmspec.cli import app

    fuyu(tmp_path / "hf")
    runner = CliRunner()
    spec = tmp_path / "imported.vlm"
    assert runner.invoke(app, ["import-hf", str(tmp_path / "hf"), "-o", str(spec)]).exit_code == 0
    spec.write_text(spec.read_text().replace('prompt = "{image}<s>{q}<0x04>"', 'prompt = "{image}<s>{q}"'))
    assert runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")]).exit_code == 0
    r = runner.invoke(app, ["export-hf", str(tmp_path / "built"), "-o", str(tmp_path / "out")])
    assert r.exit_code != 0
    line = next(x for x in r.output.splitlines() if "error[E0586]" in x)
    assert "prompt" in line


def test_persimmon_folder_as_component_weights(tmp_path):
    """`weights = DIR` of a `PersimmonForCausalLM` folder: the language model alone answers as it does."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights

    cfg = transformers.PersimmonConfig(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256, qk_layernorm=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.25})
    torch.manual_seed(0)
    lm = transformers.PersimmonForCausalLM(cfg).eval()
    randomise(lm)
    lm.save_pretrained(str(tmp_path / "persimmon"))
    spec = tmp_path / "s.vlm"
    spec.write_text(f"""model p {{
  vision img = patches {{ patch_size = 4  layout = rows(canvas = [24, 32]) }}
  connector proj = linear(img -> llm)
  language llm = persimmon {{ width = 64  depth = 2  heads = 4  ffn = 128  vocab = {N_VOCAB}  max_positions = 256
    rope_theta = 10000  partial_rotary = 0.25  weights = "{tmp_path / 'persimmon'}" }}
  fusion prefix(proj -> llm) {{ image_token = "|SPEAKER|" }}
}}
""")
    analysis, _ = load_analysis(f"{spec}:p")
    ours, report = build_with_weights(analysis, image_token_id=SPEAKER)
    assert report.components["llm"].status == "loaded"
    ids = torch.randint(6, N_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - lm(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("targets", ["", ", targets = [attn.qkv, attn.o, mlp.fc1, mlp.fc2]"])
def test_lora_adds_what_the_compiler_counts(tmp_path, targets):
    """`lora llm(...)` on a persimmon wraps the fused `query_key_value` (the default), the output and the MLP,
    and adds as many parameters as `vlm summary` says."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.lora import inject_lora, lora_parameters

    root = Path(__file__).resolve().parents[2]
    text = (root / "specs" / "fuyu-8b.vlm").read_text()
    text += ("model lora_tiny extends fuyu_8b_tiny {\n"
             f"  stage pretrain {{ train proj  lora llm(rank = 4{targets})  precision fp32 }}\n}}\n")
    (tmp_path / "f.vlm").write_text(text)
    analysis = load_analysis(f"{tmp_path / 'f.vlm'}:lora_tiny")[0]
    model = build_model(analysis)
    inject_lora(model, analysis, analysis.ir.stages[0])
    added = sum(p.numel() for p in lora_parameters(model))
    lm = analysis.ir.components["llm"].config
    per_layer = 4 * (lm.width + 3 * lm.width)
    if targets:
        per_layer += 4 * (2 * lm.width + 2 * (lm.width + lm.ffn))
    assert added == analysis.plans[0].lora_params == lm.depth * per_layer


def test_flat_config_imports_alike(tmp_path):
    """adept/fuyu-8b's config.json keeps the text model's keys at the top level (no `text_config`): the same
    spec and the same logits."""
    hf, ip = fuyu(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    text = cfg.pop("text_config")
    flat = {**{k: v for k, v in text.items() if k != "model_type"}, **cfg}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(flat))
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and report.components["llm"].status == "loaded"
    image = noise_image(tmp_path / "img.png", (18, 13), colour=True)
    px, rows, cols = hf_patches(ip, image)
    ids = reference_ids(rows, cols, "a red square")
    sizes = torch.tensor([[13, 18]])
    ours_px = px.reshape(1, rows * cols, PATCH, PATCH, 3).permute(0, 1, 4, 2, 3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px[None]).logits
        out = ours(ids, pixel_values=ours_px, image_sizes=sizes).logits
    assert (ref - out).abs().max() <= 1e-4

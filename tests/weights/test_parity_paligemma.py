"""PaliGemma: import a tiny `PaliGemmaForConditionalGeneration` and compare with transformers: logits
within 1e-4 (fp32) and 16 greedy tokens identical, the prompt attending bidirectionally (prefix-LM) as
the processor's `token_type_ids` make transformers do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, assert_sees_image, cli_round_trip, imported, randomise  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.runtime.decoding import KVCache  # noqa: E402

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
N_IMAGE = 16  # (32 / 8) ** 2 patches


def paligemma(out: Path, *, width: int = 48, kv_heads: int = 2, head_dim: int = 16, head: bool = True,
              seed: int = 0):
    """Vision width 32 -> projection to the text width (not the default 2048); Gemma with GQA and a
    head_dim that is not width / heads."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           vision_use_head=head),
        text_config=dict(model_type="gemma", vocab_size=128, hidden_size=width, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=256),
        image_token_id=IMAGE_TOKEN, projection_dim=width)
    torch.manual_seed(seed)
    m = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


def prompts(pad: int, rows: int = 2, text: int = 6, seed: int = 4):
    """PaliGemma's processor layout, left-padded: [pad] <image> x 16, <bos>, prompt, "\\n"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        p = pad * i
        out.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.full((N_IMAGE,), IMAGE_TOKEN),
                              torch.tensor([2]), torch.randint(3, 99, (text - p,), generator=g), torch.tensor([108])]))
    ids = torch.stack(out)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[pad * i] for i in range(rows)])).long()
    return ids, mask


PALIGEMMA = {"gqa_head_dim16": dict(), "mqa_no_pool_head": dict(kv_heads=1, head=False),
             "width64_mha": dict(width=64, kv_heads=4, head_dim=16)}


@pytest.mark.parametrize("variant", list(PALIGEMMA))
def test_paligemma_parity(tmp_path, variant):
    kw = PALIGEMMA[variant]
    hf = paligemma(tmp_path / "hf", **kw)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    text = mapping["spec"]
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values())
    assert 'prefix_attention = "bidirectional"' in text
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert ours.components["llm"].lm_head.weight is ours.components["llm"].model.embed_tokens.weight
    ids, mask = prompts(pad=2)
    tti = torch.zeros_like(ids)  # what the processor returns for prompts without a suffix
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    real = mask.bool()
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, token_type_ids=tti).logits, px,
                      real=real)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, token_type_ids=tti).logits
        out = ours(ids, attention_mask=mask, pixel_values=px, prefix_mask=tti == 0).logits
        assert (ref[real] - out[real]).abs().max() <= 1e-4
        prefill = ours(ids, attention_mask=mask, pixel_values=px, cache=KVCache()).logits  # a prompt (serving)
        assert (ref[real] - prefill[real]).abs().max() <= 1e-4
        causal = ours(ids, attention_mask=mask, pixel_values=px).logits  # no prefix given: causal
        assert (ref[real] - causal[real]).abs().max() > 1e-3
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, token_type_ids=tti,
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
                           suppress_tokens=[IMAGE_TOKEN])[:, ids.shape[1]:]
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16)
    assert torch.equal(got, want)
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, use_cache=False),
                       want)


def test_paligemma_prefix_and_suffix_match_token_type_ids(tmp_path):
    """Training layout: prompt (token_type 0, bidirectional) + answer (token_type 1, causal); the
    prefix comes from `prefix_mask` or, equally, from the labels; the loss matches too."""
    hf = paligemma(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    ids, mask = prompts(pad=0)
    answer = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([ids, answer, torch.ones(2, 1, dtype=torch.long)], 1)  # answer + <eos>
    mask = torch.ones_like(ids)
    tti = torch.cat([torch.zeros(2, ids.shape[1] - 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
    labels = ids.masked_fill(tti == 0, -100)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, token_type_ids=tti).logits, px)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, token_type_ids=tti, labels=labels)
        explicit = ours(ids, attention_mask=mask, pixel_values=px, prefix_mask=tti == 0).logits
        from_labels = ours(ids, attention_mask=mask, pixel_values=px, labels=labels)
    assert (ref.logits - explicit).abs().max() <= 1e-4
    assert (ref.logits - from_labels.logits).abs().max() <= 1e-4
    assert abs(float(ref.loss) - float(from_labels.loss)) <= 1e-4


def test_paligemma_cli_round_trip(tmp_path):
    """`vlm import-hf` -> `vlm check` / `vlm fmt --check` -> `vlm build` -> the same logits."""
    hf = paligemma(tmp_path / "hf", kv_heads=1, head=False)
    model = cli_round_trip(tmp_path / "hf", tmp_path)
    assert model.image_token_id == IMAGE_TOKEN and model.bidirectional_prefix
    ids, mask = prompts(pad=0, rows=1)
    px = torch.randn(1, 3, 32, 32)
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p,
                                   token_type_ids=torch.zeros_like(ids)).logits, px)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, pixel_values=px, prefix_mask=torch.ones_like(ids, dtype=torch.bool))
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, token_type_ids=torch.zeros_like(ids)).logits
    assert (ours.logits - ref).abs().max() <= 1e-4


def test_library_spec_training_batch_marks_the_prompt():
    """specs/paligemma-3b.vlm declares the prefix-LM; the processor's training batches carry
    `prefix_mask` (the trainer pops the labels), so forward sees the same prefix as with labels."""
    from vlmspec.runtime.inputs.processor import Encoded, Processor
    from vlmspec.runtime.model import build_model

    analysis, _ = load_analysis(f"{ROOT}/specs/paligemma-3b.vlm:paligemma_3b_tiny")

    class Tok:
        pad_token_id, bos_token_id, eos_token_id = 0, 2, 1

        def get_vocab(self):
            return {"<image>": 300}

    proc = Processor(analysis, Tok())
    examples = [Encoded([2, 5, 6, 7, 8, 1], [-100, -100, -100, 7, 8, 1]), Encoded([2, 5, 9, 1], [-100, -100, 9, 1])]
    batch = proc.training_batch(examples, None)
    assert batch["prefix_mask"].tolist() == [[True, True, True, False, False, False],
                                             [True, True, False, False, False, False]]
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    assert model.bidirectional_prefix
    labels = batch.pop("labels")
    with torch.no_grad():
        a = model(**batch).logits
        b = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        c = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.equal(a[real], b[real]) and not torch.allclose(a[real], c[real])

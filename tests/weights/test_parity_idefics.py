"""IDEFICS: import a tiny `IdeficsForVisionText2Text` and compare with transformers: logits within 1e-4
(fp32) and 16 greedy tokens identical, with and without the perceiver resampler, with and without
query / key norms, scalar and per-channel gates, with and without extra vocabulary rows.

Transformers is given what the IDEFICS processor gives it: `pixel_values` [b x n_images x c x h x w]
(a row with fewer images padded with zero images) and the `image_attention_mask` its own functions
compute from the ids (each token sees the latest image at or before it, none before the first). Ours
reads the same from the `<image>` tokens (`image_attention = latest`); generated tokens see the image of
the prompt's last token in both."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, built, cli_round_trip, imported, randomise, refusal  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402
from vlmspec.runtime.decoding import KVCache  # noqa: E402
from vlmspec.runtime.weights import import_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.idefics.processing_idefics import (  # noqa: E402
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
EOS = 2


def idefics(out: Path, *, extra: int = 2, resampler: bool = True, qk: bool = True, alpha: str = "float",
            depth: int = 4, interval: int = 2, image_token: int | None = None, seed: int = 0, **over):
    """A tiny IDEFICS; gates and norms are randomised (transformers starts the gates at 0, which would
    hide the cross-attention), and `<image>` is named in added_tokens.json when `image_token` is given."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    kw = dict(vocab_size=VOCAB, additional_vocab_size=extra, hidden_size=64, intermediate_size=96, initializer_range=0.1,
              num_hidden_layers=depth, num_attention_heads=4, max_position_embeddings=256,
              cross_layer_interval=interval, qk_layer_norms=qk, alpha_type=alpha, use_resampler=resampler,
              vision_config=dict(embed_dim=32, image_size=32, patch_size=8, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4),
              perceiver_config=dict(use_resampler=resampler, resampler_n_latents=4, resampler_depth=2,
                                    resampler_n_heads=2, resampler_head_dim=16, qk_layer_norms_perceiver=qk))
    kw.update(over)
    cfg = transformers.IdeficsConfig(**kw)
    torch.manual_seed(seed)
    m = transformers.IdeficsForVisionText2Text(cfg).eval()
    randomise(m, fresh=("latents",), seed=seed)
    m.save_pretrained(str(out))
    if image_token is not None:
        (out / "added_tokens.json").write_text(json.dumps({"<fake_token_around_image>": image_token - 1,
                                                           "<image>": image_token}))
    return m


class _Tok:
    """What the processor's `image_attention_mask_for_packed_input_ids` reads from a tokenizer."""

    eos_token_id = EOS

    def __init__(self, image: int):
        self.image = image

    def convert_tokens_to_ids(self, token: str) -> int:
        assert token == "<image>"
        return self.image


def image_attention_mask(ids: torch.Tensor, image: int, n_images: int) -> torch.Tensor:
    """The IDEFICS processor's `image_attention_mask` [b x s x n_images] for these ids."""
    incremental, _ = image_attention_mask_for_packed_input_ids(ids.clone(), _Tok(image), "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=n_images)


def batch(image: int, images: list[int], pads: list[int], seed: int = 3, text: int = 4):
    """Left-padded rows as the processor lays them out: <s> text (<fake> <image> <fake> text) per image;
    pixel_values [b x max images x 3 x 32 x 32], zero images where a row has fewer."""
    g = torch.Generator().manual_seed(seed)
    fake = image - 1
    rows = []
    for n, pad in zip(images, pads, strict=True):
        parts = [torch.zeros(pad, dtype=torch.long), torch.tensor([1]), torch.randint(3, 99, (2,), generator=g)]
        for _ in range(n):
            parts += [torch.tensor([fake, image, fake]), torch.randint(3, 99, (text,), generator=g)]
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    n = max(images)
    px = torch.randn(len(rows), n, 3, 32, 32, generator=g)
    for i, k in enumerate(images):
        px[i, k:] = 0
    return ids, mask, px, image_attention_mask(ids, image, n)


# Seeds and configurations of the parity runs.
VARIANTS = {
    "resampler_qk_norms_extra_vocab": dict(seed=5),
    "vision_only_vector_gates": dict(resampler=False, qk=False, alpha="vector", depth=3, interval=1, seed=1),
    "base_vocab_image_token": dict(extra=0, qk=False, depth=6, interval=3, image_token=100, seed=5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_idefics_parity(tmp_path, variant):
    kw = VARIANTS[variant]
    hf = idefics(tmp_path / "hf", **kw)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    image = mapping["image_token_id"]
    assert report.ok and all(c.status == "loaded" for c in report.components.values()), report.summary()
    assert 'image_attention = "latest"' in mapping["spec"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert image == kw.get("image_token", VOCAB + kw.get("extra", 2) - 1)
    ids, mask, px, iam = batch(image, images=[2, 1, 2], pads=[0, 9, 2])
    real = mask.bool()
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, image_attention_mask=iam).logits,
                      px, real=real)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
        assert (ref[real] - out[real]).abs().max() <= 1e-4
        prefill = ours(ids, attention_mask=mask, pixel_values=px, cache=KVCache()).logits
        assert (ref[real] - prefill[real]).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam,
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16), want)
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, use_cache=False),
                       want)


def test_idefics_generated_image_token_keeps_the_prompts_image(tmp_path):
    """Cached decoding gives generated tokens the image of the prompt's last token, as transformers'
    `generate` does, even after the model generates `<image>` (this seed does)."""
    hf = idefics(tmp_path / "hf", seed=7)
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    image = mapping["image_token_id"]
    ids, mask, px, iam = batch(image, images=[2, 1, 2], pads=[0, 9, 2])
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam,
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, ids.shape[1]:]
    assert (want[:, :-1] == image).any()
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16), want)
    # recomputed without a cache, the generated `<image>` is text too
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, use_cache=False),
                       want)


def test_idefics_latest_image_is_what_matters(tmp_path):
    """With two images the mask is exercised: attending to both (`image_attention = all`) differs;
    one image per row, every token after it sees it either way."""
    hf = idefics(tmp_path / "hf")
    latest, _, mapping = imported(tmp_path / "hf", tmp_path)
    image = mapping["image_token_id"]
    both = built(mapping["spec"].replace('image_attention = "latest"', 'image_attention = "all"'), mapping, tmp_path,
                 "all.vlm")
    ids, mask, px, iam = batch(image, images=[2, 2], pads=[0, 0])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam).logits
        a, b = latest(ids, attention_mask=mask, pixel_values=px).logits, both(ids, attention_mask=mask, pixel_values=px).logits
    assert (ref - a).abs().max() <= 1e-4 and (ref - b).abs().max() > 1e-3


def test_idefics_text_only(tmp_path):
    """No image at all: transformers needs pixel_values and an all-zero image_attention_mask (the
    processor's text-only output); the cross-attention adds nothing but the gated feed-forward still
    runs. Ours takes no pixel_values."""
    hf = idefics(tmp_path / "hf", seed=1)
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 99, (2, 9), generator=g)], 1)
    mask = torch.ones_like(ids)
    px = torch.zeros(2, 1, 3, 32, 32)
    iam = torch.zeros(2, ids.shape[1], 1, dtype=torch.long)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam).logits
        out = ours(ids, attention_mask=mask).logits
        assert (ref - out).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam,
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=16), want)


def test_idefics_beam_search_keeps_each_beams_image(tmp_path):
    """Beam search reorders the cache, the cross-attention K / V and the image count alike: cached and
    recomputed beams agree."""
    idefics(tmp_path / "hf", seed=2)
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    image = mapping["image_token_id"]
    ids, mask, px, _ = batch(image, images=[2, 1], pads=[0, 7])
    cached = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, num_beams=3)
    plain = ours.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, num_beams=3, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize(("over", "message"), [
    (dict(num_hidden_layers=5, cross_layer_interval=2), "cross_layer_interval 2 for 5 decoder layers"),
    (dict(tie_word_embeddings=True), "tied decoupled embeddings"),
    (dict(hidden_act="gelu"), "text activation gelu"),
])
def test_idefics_refuses_what_a_spec_cannot_say(tmp_path, over, message):
    folder = tmp_path / "hf"
    cfg = transformers.IdeficsConfig(vocab_size=VOCAB, additional_vocab_size=2, hidden_size=64,
                                     num_attention_heads=4, vision_config=dict(embed_dim=32, num_attention_heads=4))
    diag = refusal(folder, {**cfg.to_dict(), **over})
    assert diag.code == "E0585" and message in diag.message


def test_idefics_without_a_named_image_token_and_no_extra_rows_is_refused(tmp_path):
    idefics(tmp_path / "hf", extra=0, depth=2, interval=1)
    with pytest.raises(UserInputError) as e:
        import_hf(tmp_path / "hf")
    diag = e.value.diagnostics[0]
    assert diag.code == "E0585" and "<image>" in diag.message


def test_idefics_cli_round_trip(tmp_path):
    """`vlm import-hf` -> `vlm check` / `vlm fmt --check` -> `vlm build` -> the same logits."""
    hf = idefics(tmp_path / "hf", resampler=False, alpha="vector")
    model = cli_round_trip(tmp_path / "hf", tmp_path)
    image = VOCAB + 1
    assert model.image_token_id == image
    ids, mask, px, iam = batch(image, images=[2], pads=[0])
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, image_attention_mask=iam).logits,
                      px)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, pixel_values=px).logits
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=iam).logits
    assert (ours - ref).abs().max() <= 1e-4


def test_library_spec_is_idefics():
    """specs/idefics-9b.vlm reads images as IDEFICS does: latest image only, ReLU resampler MLP."""
    from vlmspec.runtime.model import build_model

    analysis, _ = load_analysis(f"{ROOT}/specs/idefics-9b.vlm:idefics_9b_tiny")
    comps = analysis.ir.components
    assert comps["cross_attention"].config.image_attention == "latest"
    assert comps["resampler"].config.act == "relu"
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    fusion = model.fusion("cross_attention")
    assert fusion.latest and fusion.tokens_per_image == 4

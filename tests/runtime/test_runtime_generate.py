"""Generation: the KV cache changes nothing (greedy, batched, left-padded), padding changes nothing,
sampling is reproducible from its seed, beam search and eos stopping behave."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import CASES, analyse, image_tokens, pixels, prompts

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.generate import sample_top_p, top_p_filter
from vlmspec.runtime.model import build_model


def _model(tmp_path, case: str):
    analysis = analyse(tmp_path, CASES[case].text())
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    ids, mask = prompts(model.image_token_id, image_tokens(analysis))
    return analysis, model, ids, mask, pixels(analysis)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cache_gives_the_same_tokens(tmp_path, case):
    _, model, ids, mask, px = _model(tmp_path, case)
    cached = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    plain = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, use_cache=False)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, plain)
    assert not bool((cached == model.image_token_id).any())


@pytest.mark.parametrize("case", ["connector-mlp", "lm-opt", "lm-phi", "lm-mrope", "fusion-cross_attention",
                                  "fusion-visual_expert", "fusion-moe"])
def test_left_padding_changes_nothing(tmp_path, case):
    _, model, ids, mask, px = _model(tmp_path, case)
    batched = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    pad = int((mask[1] == 0).sum())
    alone = model.generate(ids[1:, pad:], pixel_values=px[1:], max_new_tokens=8)
    assert torch.equal(batched[1:], alone)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, pixel_values=px).logits[1, pad:]
        ref = model(ids[1:, pad:], pixel_values=px[1:]).logits[0]
    assert torch.allclose(full, ref, atol=1e-5)


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(tmp_path):
    _, model, ids, mask, px = _model(tmp_path, "connector-mlp")
    kw = dict(attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=True, temperature=1.5)
    a = model.generate(ids, seed=7, **kw)
    assert torch.equal(a, model.generate(ids, seed=7, **kw))
    assert torch.equal(a, model.generate(ids, seed=7, use_cache=False, **kw))
    assert not torch.equal(a, model.generate(ids, seed=8, **kw))
    greedy = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    assert torch.equal(greedy, model.generate(ids, seed=1, top_p=1e-6, **kw))


def test_top_p_keeps_the_smallest_set_that_reaches_top_p():
    """As Hugging Face's `TopPLogitsWarper`: the most likely tokens until their mass is >= top_p (a mass
    exactly at top_p is enough), never fewer than one."""
    probs = torch.tensor([[0.2, 0.5, 0.3]])  # 0.5 + 0.3 is 0.8 exactly in float32, as 0.8 is

    def kept(top_p: float) -> list[bool]:
        return (top_p_filter(probs, top_p) > 0)[0].tolist()

    assert kept(0.8) == [False, True, True]
    assert kept(0.5) == [False, True, False]
    assert kept(0.81) == [True, True, True]
    assert kept(0.79) == [False, True, True]
    assert kept(1e-6) == [False, True, False]
    assert torch.equal(top_p_filter(probs, 0.8), torch.tensor([[0.0, 0.5, 0.3]]))  # kept mass unchanged
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_top_p(probs.log().expand(64, -1), 1.0, 0.79, g) for _ in range(8)])
    assert set(draws.unique().tolist()) == {1, 2}


def test_global_rng_is_untouched_by_seeded_sampling(tmp_path):
    _, model, ids, mask, px = _model(tmp_path, "connector-mlp")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=True, seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("case", ["connector-mlp", "fusion-cross_attention", "fusion-visual_expert"])
def test_beam_search(tmp_path, case):
    _, model, ids, mask, px = _model(tmp_path, case)
    cached = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, num_beams=3)
    plain = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, num_beams=3, use_cache=False)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, plain)
    greedy = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=6)
    assert torch.equal(model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, num_beams=1),
                       greedy)
    assert _logprob(model, ids, mask, px, cached) >= _logprob(model, ids, mask, px, greedy) - 1e-4


def _logprob(model, ids, mask, px, new) -> float:
    """Sum over the batch of log p(new tokens | prompt)."""
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        logp = model(full, attention_mask=full_mask, pixel_values=px).logits.log_softmax(-1)
    picked = logp[:, ids.shape[1] - 1:-1].gather(-1, new[..., None])
    return float(picked.sum())


def test_stops_at_eos_and_pads(tmp_path):
    _, model, ids, mask, px = _model(tmp_path, "connector-mlp")
    greedy = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    eos = int(greedy[0, 2])
    out = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, eos_token_id=[eos, 299],
                         pad_token_id=0)
    assert torch.equal(out[0, :3], greedy[0, :3])
    assert bool((out[0, 3:] == 0).all())
    first_eos = [int((row == eos).nonzero()[0]) if bool((row == eos).any()) else None for row in greedy]
    if first_eos[1] is None:
        assert torch.equal(out[1], greedy[1, : out.shape[1]])
    one = model.generate(ids[:1], attention_mask=mask[:1], pixel_values=px[:1], max_new_tokens=8, eos_token_id=eos)
    assert one.shape == (1, 3)


def test_cross_attention_visual_kv_is_computed_once(tmp_path, monkeypatch):
    _, model, ids, mask, px = _model(tmp_path, "fusion-cross_attention")
    calls = []
    fusion = model.components["xattn"]
    for layer in fusion.layers.values():
        original = layer.cross_attn.kv
        monkeypatch.setattr(layer.cross_attn, "kv", lambda v, f=original: calls.append(1) or f(v))
    model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=5)
    assert len(calls) == len(fusion.layers)


def test_bad_generation_arguments_are_user_errors(tmp_path):
    _, model, ids, mask, px = _model(tmp_path, "connector-mlp")
    for kw, msg in ((dict(top_p=0.0), "top_p"), (dict(do_sample=True, temperature=0.0), "temperature"),
                    (dict(num_beams=2, do_sample=True), "beam"), (dict(max_new_tokens=-1), "max_new_tokens")):
        with pytest.raises(UserInputError, match=msg) as e:
            model.generate(ids, attention_mask=mask, pixel_values=px, **kw)
        assert e.value.diagnostics[0].code == "E0517", msg

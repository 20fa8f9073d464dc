"""BLIP-2's first-stage losses checked against a reference: with the weights of a transformers
`Blip2ForImageTextRetrieval` (every parameter randomised), our ITC, ITM and ITG losses equal those computed
from transformers' own Q-Former outputs (within 1e-5), so the first stage trains the published objectives.

- ITC: transformers' `logits_per_image` (the best query's cosine similarity) over the temperature, with
  BLIP-2's label smoothing, both directions.
- ITM: transformers' image-text matching head on the true pairs and on the hard negatives our loss drew.
- ITG: transformers' `Blip2QFormerModel` run with BLIP-2's multimodal causal mask (queries see queries, text
  sees the queries and its past), then the BERT prediction head (tied to the word embeddings), next-token
  cross-entropy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.runtime.model import build_model  # noqa: E402
from vlmspec.runtime.train import objectives as O  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weights"))
from hf_tiny import randomise  # noqa: E402

SPEC = """
model b2 {
  vision eva = eva { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64  feature = layer(-1).all }
  connector qf = qformer(eva -> llm) { queries = 4  width = 32  depth = 2  heads = 2  mlp = 64  pretrain = true
                                       text_vocab = 96  max_text = 24  embed_dim = 16 }
  language llm = opt { width = 48  depth = 1  heads = 4  ffn = 96  vocab = 128  max_positions = 64 }
  fusion prefix(qf -> llm) { tokens = 4 }
}
"""


def _reference() -> torch.nn.Module:
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6,
                           initializer_range=0.02),  # its default (1e-10) leaves the tower ~0
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, cross_attention_frequency=2, vocab_size=96,
                            max_position_embeddings=24, use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=16, image_token_index=None)
    torch.manual_seed(0)
    ref = transformers.Blip2ForImageTextRetrieval(cfg).eval()
    randomise(ref)
    with torch.no_grad():
        # weights of a trained model's scale: at the init's 0.02 each attention's output is small next to the
        # residual, the tied ITG logits are all but uniform, and what a token reads would hardly show
        ref.embeddings.word_embeddings.weight.mul_(25)
        for name, p in ref.qformer.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(10)
    return ref


def _ours(tmp_path: Path, ref: torch.nn.Module) -> torch.nn.Module:
    spec = tmp_path / "b2.vlm"
    spec.write_text(SPEC)
    torch.manual_seed(1)
    model = build_model(load_analysis(str(spec))[0]).eval()
    own = model.state_dict()
    mapped = {}
    for k, v in ref.state_dict().items():
        ours = "components.eva." + k[len("vision_model."):] if k.startswith("vision_model.") else "components.qf." + k
        assert ours in own, f"{k} -> {ours} has no place"
        mapped[ours] = v
    model.load_state_dict(mapped, strict=False)
    with torch.no_grad():  # the parts transformers' class does not hold: a temperature and the ITG head
        qf = model.components["qf"]
        qf.temp.fill_(0.11)
        for p in qf.itg_head.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = _reference()
    return ref, _ours(tmp_path_factory.mktemp("b2"), ref)


def _batch(n: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(3, 96, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    mask[3, length - 1:] = 0
    return pixels, O.TextBatch(ids, mask)


def test_itc_equals_the_reference(pair) -> None:
    ref, model = pair
    pixels, text = _batch()
    with torch.no_grad():
        ours = O.first_stage_losses(model, "qf", pixels, text, {"itc"})["itc"]
        sim = ref(pixel_values=pixels, input_ids=text.ids, attention_mask=text.mask,
                  use_image_text_matching_head=False).logits_per_image / 0.11
        target = torch.arange(sim.shape[0])
        want = (F.cross_entropy(sim, target, label_smoothing=0.1) + F.cross_entropy(sim.t(), target,
                                                                                   label_smoothing=0.1)) / 2
    assert float(ours) == pytest.approx(float(want), abs=1e-5)
    assert float(want) > 0.1  # a loss that says something


def test_itm_equals_the_reference_on_the_same_negatives(pair, monkeypatch) -> None:
    ref, model = pair
    pixels, text = _batch()
    drawn: list[torch.Tensor] = []
    real = O._hard_negatives

    def record(sim):
        out = real(sim)
        drawn.append(out)
        return out

    monkeypatch.setattr(O, "_hard_negatives", record)
    torch.manual_seed(3)
    with torch.no_grad():
        ours = O.first_stage_losses(model, "qf", pixels, text, {"itc", "itm"})["itm"]
    neg_image, neg_text = drawn  # for each text an image, then for each image a text (objectives.itm_loss)
    n = pixels.shape[0]
    images = torch.cat([pixels, pixels[neg_image], pixels])
    ids = torch.cat([text.ids, text.ids, text.ids[neg_text]])
    mask = torch.cat([text.mask, text.mask, text.mask[neg_text]])
    with torch.no_grad():
        logits = ref(pixel_values=images, input_ids=ids, attention_mask=mask,
                     use_image_text_matching_head=True).logits_per_image
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)])
    assert float(ours) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-5)


def test_itg_equals_the_reference(pair) -> None:
    ref, model = pair
    pixels, text = _batch()
    qf = model.components["qf"]
    with torch.no_grad():
        ours = O.first_stage_losses(model, "qf", pixels, text, {"itg"})["itg"]
        image = ref.vision_model(pixel_values=pixels).last_hidden_state
        n, length = text.ids.shape
        nq = ref.query_tokens.shape[1]
        total = nq + length
        allowed = torch.zeros(n, total, total, dtype=torch.long)
        allowed[:, :nq, :nq] = 1
        allowed[:, nq:, :nq] = 1
        allowed[:, nq:, nq:] = torch.ones(length, length, dtype=torch.long).tril()
        allowed = allowed * torch.cat([torch.ones(n, nq, dtype=torch.long), text.mask], 1)[:, None, :]
        head = qf.itg_head  # BERT's prediction head: dense, GELU, LayerNorm, then the tied word embeddings
        t = head.transform
        targets = text.ids[:, 1:].masked_fill(text.mask[:, 1:] == 0, -100)

        def loss_with(mask: torch.Tensor) -> float:
            h = ref.qformer(query_embeds=ref.embeddings(input_ids=text.ids,
                                                        query_embeds=ref.query_tokens.expand(n, -1, -1)),
                            query_length=nq, attention_mask=mask[:, None].bool(), encoder_hidden_states=image,
                            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
            x = F.layer_norm(F.gelu(t.dense(h[:, nq:-1])), (h.shape[-1],), t.LayerNorm.weight, t.LayerNorm.bias,
                             t.LayerNorm.eps)
            logits = x @ ref.embeddings.word_embeddings.weight.t() + head.bias
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                         label_smoothing=0.1))

        want = loss_with(allowed)
        # the control: text that could read ahead (a bidirectional mask) would give another loss
        leaky = loss_with(torch.ones_like(allowed) * torch.cat([torch.ones(n, nq, dtype=torch.long), text.mask],
                                                               1)[:, None, :])
    assert float(ours) == pytest.approx(want, abs=1e-5)
    assert abs(leaky - want) > 1e-3

"""The contrastive losses against their formulas and against transformers' CLIP / SigLIP losses."""

from __future__ import annotations

import math

import pytest
import torch

from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.train.objectives_contrastive import contrastive_loss, sigmoid_loss, softmax_loss


def _logits(n: int = 5, m: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m or n, generator=g, dtype=torch.float64) * 3


def test_softmax_loss_is_the_mean_of_both_cross_entropies():
    z = _logits()
    n = z.shape[0]
    by_image = -sum(z[i, i] - torch.logsumexp(z[i], 0) for i in range(n)) / n
    by_text = -sum(z[j, j] - torch.logsumexp(z[:, j], 0) for j in range(n)) / n
    assert torch.allclose(softmax_loss(z), (by_image + by_text) / 2, atol=1e-12)


def test_sigmoid_loss_sums_each_row_and_divides_by_the_batch():
    z = _logits(4)
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            sign = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-sign * z[i, j].item())))
    assert abs(sigmoid_loss(z).item() - total / n) < 1e-10


def test_one_pair_is_refused():
    with pytest.raises(VlmSpecError) as e:
        contrastive_loss(torch.zeros(1, 1), "softmax")
    assert "E0616" in str(e.value)


def test_matches_transformers_clip_and_siglip_losses():
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    ids = torch.randint(1, 98, (3, 7))
    px = torch.randn(3, 3, 32, 32)

    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1 / 0.07))
        out = clip(input_ids=ids, pixel_values=px, return_loss=True)
    assert torch.allclose(softmax_loss(out.logits_per_image), out.loss, atol=1e-5)

    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(10.0))
        siglip.logit_bias.fill_(-10.0)
        out = siglip(input_ids=ids, pixel_values=px, return_loss=True)
    assert torch.allclose(sigmoid_loss(out.logits_per_image), out.loss, atol=1e-5)

"""The two contrastive losses, on a `[B x B]` logit matrix whose diagonal holds the matching pairs.

- `softmax` (CLIP): each image picks its caption among the batch's captions and each caption its image;
  the loss is the mean of the two cross-entropies.
- `sigmoid` (SigLIP): every image-caption pair is an independent binary problem, positive on the
  diagonal and negative elsewhere; the per-pair log-sigmoid losses are summed over each row and
  averaged over the rows (the SigLIP paper's normalisation: by the batch size, not by B^2), so the
  loss does not need the whole batch's softmax and the learned bias offsets the many negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.diagnostics import user_error


def softmax_loss(logits: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE; `logits[i, j]` = scaled similarity of image i and caption j."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def sigmoid_loss(logits: Tensor) -> Tensor:
    """SigLIP's pairwise loss; `logits` already hold scale * cos + bias."""
    n = logits.shape[0]
    signs = 2 * torch.eye(n, logits.shape[1], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def contrastive_loss(logits: Tensor, kind: str) -> Tensor:
    if logits.shape[0] < 2:
        raise user_error("E0616", f"a contrastive loss needs at least 2 pairs per batch, got {logits.shape[0]}",
                         help="the other pairs of a batch are each pair's negatives: raise the micro-batch")
    return softmax_loss(logits.float()) if kind == "softmax" else sigmoid_loss(logits.float())

"""BLIP-2's first-stage objectives for a Q-Former: image-text contrastive (itc), image-text matching
with hard negatives (itm) and image-grounded text generation (itg).

All three share one Q-Former whose self-attention layers serve queries and text; only the attention
mask tells the tasks apart (Li et al., 2023, figure 2):

- itc: queries and text run separately; the similarity of an image and a text is the best match of
  any query (projected, normalised) with the text's first token, over a learned temperature.
- itm: queries and text run together with full attention; a linear head on the query outputs,
  averaged, says "matched" or not, on the true pairs and on one hard negative per image and per
  text, drawn in proportion to the contrastive similarity.
- itg: the text reads every query and the text before it (causal); the queries read only each
  other. A BERT prediction head tied to the word embeddings predicts each next token.

Text is tokenised with the model's tokenizer ([bos] caption [eos]); its ids index the Q-Former's own
text embeddings, so the tokenizer must fit in `text_vocab`. Negatives are drawn within a
micro-batch (each process's own under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.connectors.qformer import QFormerConnector

FIRST_STAGE = ("itc", "itm", "itg")
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the contrastive and generation targets


@dataclass(slots=True)
class TextBatch:
    """Right-padded Q-Former text: ids [n x l], mask [n x l] (1 = token)."""

    ids: Tensor
    mask: Tensor


def find_qformer(model: torch.nn.Module) -> tuple[str, QFormerConnector]:
    """The model's Q-Former connector (the front end has checked there is one with `pretrain`)."""
    for name in model.order:
        comp = model.components[name]
        if isinstance(comp, QFormerConnector):
            if not comp.pretrain:
                raise user_error("E0528", f"Q-Former `{name}` has no first-stage text side",
                                 help=f"set `pretrain = true` in `{name}` to train itc / itm / itg")
            return name, comp
    raise user_error("E0528", "objectives itc / itm / itg need a Q-Former connector")


def text_batch(texts: list[list[int]], bos: int, eos: int, max_len: int, vocab: int, where: str) -> TextBatch:
    """[bos] ids [eos] per text, truncated to `max_len`, right-padded with 0 (masked)."""
    rows = [[*[bos, *t][: max_len - 1], eos] for t in texts]
    top = max(max(r) for r in rows)
    if top >= vocab:
        raise user_error("E0528", f"{where}: the tokenizer's id {top} does not fit the Q-Former's text vocabulary "
                         f"({vocab})", help=f"set `text_vocab = {top + 1}` (or more) in the Q-Former")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return TextBatch(ids, mask)


def image_features(model: torch.nn.Module, qformer_name: str, pixel_values: Tensor) -> Tensor:
    """Run the vision side up to the Q-Former: the features it cross-attends to [n x t x e]."""
    outs: dict[str, VisualTokens] = {}
    for name in model.order:
        comp = model.components[name]
        if model.roles[name] == "vision":
            outs[name] = comp(pixel_values)
        elif name == qformer_name:
            return comp.merged_features([outs[s] for s in model.sources[name]])
        elif model.roles[name] == "connector":
            outs[name] = comp([outs[s] for s in model.sources[name]])
    raise AssertionError("the Q-Former was not reached")


def _pad_keys(mask: Tensor, n_query: int) -> Tensor:
    """Key mask over [queries; text]: queries always visible, text padding hidden -> [n x 1 x 1 x (q+l)]."""
    keys = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, n_query), mask], dim=1).bool()
    return keys[:, None, None, :]


def itc_features(qf: QFormerConnector, image: Tensor, text: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(query outputs [n x q x w], image embeddings [n x q x e], text embeddings [n x e]), normalised."""
    n = image.shape[0]
    queries = qf.queries_for(n)
    q_out = qf.qformer.run(qf.embed(queries, None), image, queries.shape[1], None)
    t_out = qf.qformer.run(qf.embed(None, text.ids), None, 0, text.mask.bool()[:, None, None, :])
    img = F.normalize(qf.vision_projection(q_out), dim=-1)
    txt = F.normalize(qf.text_projection(t_out[:, 0]), dim=-1)
    return q_out, img, txt


def similarity(qf: QFormerConnector, img: Tensor, txt: Tensor) -> Tensor:
    """[images x texts]: the best query's cosine similarity over the learned temperature."""
    temp = qf.temp.clamp(0.001, 0.5)
    return torch.einsum("iqe,te->itq", img, txt).amax(-1) / temp


def itc_loss(sim: Tensor) -> Tensor:
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim.t(), target, label_smoothing=LABEL_SMOOTHING)) / 2


def _hard_negatives(sim: Tensor) -> Tensor:
    """For each row, one other column drawn in proportion to softmax(similarity), the diagonal excluded."""
    weights = torch.softmax(sim.detach().float(), dim=1) + 1e-4
    weights.fill_diagonal_(0)
    return torch.multinomial(weights, 1).squeeze(1)


def itm_loss(qf: QFormerConnector, image: Tensor, text: TextBatch, sim: Tensor) -> Tensor:
    """Matched pairs (label 1) and, per image and per text, a hard negative (label 0)."""
    n = image.shape[0]
    neg_image = _hard_negatives(sim.t())  # for each text, an image
    neg_text = _hard_negatives(sim)  # for each image, a text
    images = torch.cat([image, image[neg_image], image])
    ids = torch.cat([text.ids, text.ids, text.ids[neg_text]])
    mask = torch.cat([text.mask, text.mask, text.mask[neg_text]])
    queries = qf.queries_for(3 * n)
    nq = queries.shape[1]
    h = qf.qformer.run(qf.embed(queries, ids), images, nq, _pad_keys(mask, nq))
    logits = qf.itm_head(h[:, :nq]).mean(dim=1)
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits, labels)


def itg_loss(qf: QFormerConnector, image: Tensor, text: TextBatch) -> Tensor:
    """Next-token prediction of the text from the queries (which read the image) and the text so far."""
    n, length = text.ids.shape
    queries = qf.queries_for(n)
    nq = queries.shape[1]
    total = nq + length
    allowed = torch.zeros(total, total, dtype=torch.bool, device=text.ids.device)
    allowed[:nq, :nq] = True  # queries see queries only
    allowed[nq:, :nq] = True  # text sees every query...
    allowed[nq:, nq:] = torch.ones(length, length, dtype=torch.bool, device=text.ids.device).tril()  # ...and its past
    mask = allowed[None, None] & _pad_keys(text.mask, nq)
    h = qf.qformer.run(qf.embed(queries, text.ids), image, nq, mask)
    words, _ = qf.word_table()
    logits = qf.itg_head(h[:, nq:-1] if length > 1 else h[:, nq:nq], words.weight)
    targets = text.ids[:, 1:].masked_fill(text.mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=LABEL_SMOOTHING)


def first_stage_losses(model: torch.nn.Module, qformer_name: str, pixel_values: Tensor, text: TextBatch,
                       wanted: set[str]) -> dict[str, Tensor]:
    """The requested losses (a subset of itc / itm / itg) for one micro-batch of image-text pairs."""
    qf: QFormerConnector = model.components[qformer_name]
    image = image_features(model, qformer_name, pixel_values)
    losses: dict[str, Tensor] = {}
    if wanted & {"itc", "itm"}:
        _, img, txt = itc_features(qf, image, text)
        sim = similarity(qf, img, txt)
        if "itc" in wanted:
            losses["itc"] = itc_loss(sim)
        if "itm" in wanted:
            losses["itm"] = itm_loss(qf, image, text, sim)
    if "itg" in wanted:
        losses["itg"] = itg_loss(qf, image, text)
    return losses


class FirstStageLoss(torch.nn.Module):
    """The model seen through the first-stage losses: a module whose forward returns them, so data
    parallel wrappers (DDP) see a forward pass and all-reduce the gradients of exactly these losses."""

    def __init__(self, model: torch.nn.Module, wanted: set[str]):
        super().__init__()
        self.model = model
        self.qformer_name, _ = find_qformer(model)
        self.wanted = wanted

    def forward(self, pixel_values: Tensor, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return first_stage_losses(self.model, self.qformer_name, pixel_values, TextBatch(ids, mask), self.wanted)

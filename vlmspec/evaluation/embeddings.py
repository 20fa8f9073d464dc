"""Image and caption embeddings from a vlmspec model, for zero-shot retrieval.

A generative VLM has no contrastive head, so retrieval compares what it has in one space: the visual
tokens that the connector puts into the language model's input (`model.extract_features(pixel_values)`,
mean-pooled over tokens) and the language model's input embeddings of the caption tokens (mean-pooled over
the real tokens). This measures how well the connector aligned the two modalities, which is what a
projector-only pre-training stage trains.

Model interface used (duck-typed, so a stand-in works in tests):
- `model.extract_features(pixel_values)` -> `[batch x tokens x width]` (or `[batch x width]`; a list or
  tuple of such tensors, e.g. one per fusion, is concatenated along the tokens);
- text, the first that the model has: `model.embed_text(input_ids, attention_mask)` -> `[batch x tokens x
  width]` or `[batch x width]`; `model.llm.embed(input_ids)` (vlmspec's `VisionLanguageModel`: the
  language model's scaled/projected input embeddings, the same vectors the image features are spliced
  between); `model.get_input_embeddings()(input_ids)` (the Hugging Face API).

A contrastive model (CLIP, SigLIP: `runtime/contrastive.py`) has the shared space itself: its
`extract_features` / `embed_text` are its normalised image and text embeddings, one vector each, and its
processor pads captions as its text tower was trained (`captions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.batching import batches, open_batch, progress_bar
from vlmspec.evaluation.formats import EvalSample, EvalSet


def _device(model: Any) -> Any:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None


def _as_tokens(x: Any) -> Any:
    """Model outputs as one `[batch x tokens x width]` tensor."""
    import torch

    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, list | tuple):
        x = torch.cat([t if t.dim() == 3 else t[:, None, :] for t in x], dim=1)
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise user_error("E0554", f"the model's features have an unexpected form ({type(x).__name__})")
    return x if x.dim() == 3 else x[:, None, :]


def image_embeddings(model: Any, pixel_values: Any, image_kwargs: dict[str, Any] | None = None) -> np.ndarray:
    """`[batch x width]`: the model's visual tokens for each image, mean-pooled (with the facts a tiled or
    anyres encoder's images need: the processor's `image_kwargs`)."""
    import torch

    extract = getattr(model, "extract_features", None)
    if extract is None:
        raise user_error("E0554", "this model has no `extract_features`, so it cannot embed images for retrieval")
    device = _device(model)
    if device is not None:
        pixel_values = pixel_values.to(device)
        image_kwargs = {k: v.to(device) for k, v in (image_kwargs or {}).items()}
    with torch.no_grad():
        feats = _as_tokens(extract(pixel_values, **image_kwargs) if image_kwargs else extract(pixel_values))
    return feats.float().mean(dim=1).cpu().numpy()


def text_embeddings(model: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
    """`[batch x width]`: the language model's input embeddings of each caption, mean-pooled over its tokens."""
    import torch

    device = _device(model)
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad():
        llm = getattr(model, "llm", None)
        if callable(getattr(model, "embed_text", None)):
            out = model.embed_text(input_ids, attention_mask)
        elif callable(getattr(llm, "embed", None)):
            out = llm.embed(input_ids)
        elif callable(getattr(model, "get_input_embeddings", None)):
            out = model.get_input_embeddings()(input_ids)
        else:
            raise user_error("E0554", "this model exposes no text embeddings (`embed_text`, `llm.embed` or "
                             "`get_input_embeddings`), so it cannot embed captions for retrieval")
        out = _as_tokens(out).float()
    if out.shape[1] == 1:
        return out[:, 0].cpu().numpy()
    mask = attention_mask.to(out.dtype)[:, :, None]
    return ((out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).cpu().numpy()


def _token_batch(processor: Any, texts: Sequence[str]) -> tuple[Any, Any]:
    """Right-padded caption token ids (no special tokens, no prompt template) and their mask."""
    import torch

    if callable(getattr(processor, "captions", None)):  # a contrastive model's text tower: its own fixed length
        return processor.captions(list(texts))
    seqs = [list(processor.tokenizer(t, add_special_tokens=False)["input_ids"])[: processor.max_length] or
            [processor.pad_id] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), processor.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def run_retrieval(model: Any, processor: Any, es: EvalSet, batch_size: int, max_bad: int,
                  progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Embed every image and caption of `es`, then recall@1/5/10 both ways; rows are per image."""
    from vlmspec.evaluation.retrieval import cosine_similarity, recall_at_k

    done: list[EvalSample] = []
    img_vecs: list[np.ndarray] = []
    with progress_bar(progress, len(es.samples), "eval retrieval: images") as advance:
        for chunk in batches(es.samples, batch_size):
            kept, imgs = open_batch(chunk, es.bad)
            es.check(max_bad)   # stop once unreadable images pass the limit, not at the end
            if kept:
                pixels, facts = processor.images(imgs)
                img_vecs.append(image_embeddings(model, pixels, processor.image_kwargs(facts)))
                done += kept
            advance(len(chunk))
    captions = [(i, c) for i, s in enumerate(done) for c in s.references]
    txt_vecs: list[np.ndarray] = []
    with progress_bar(progress, len(captions), "eval retrieval: captions") as advance:
        for chunk in batches(captions, batch_size):
            txt_vecs.append(text_embeddings(model, *_token_batch(processor, [c for _, c in chunk])))
            advance(len(chunk))
    images, texts = np.concatenate(img_vecs), np.concatenate(txt_vecs)
    if images.shape[1] != texts.shape[1]:
        raise user_error("E0554", f"image features have width {images.shape[1]} but text embeddings "
                         f"{texts.shape[1]}: they are not in one space, so they cannot be compared")
    owner = [i for i, _ in captions]
    sim = cosine_similarity(images, texts)
    metrics: dict[str, Any] = {**recall_at_k(sim, owner), "images": len(done), "captions": len(captions)}
    order = np.argsort(-sim, axis=1, kind="stable")
    is_own = np.asarray(owner)[order] == np.arange(len(done))[:, None]     # [images x captions], best first
    ranks = np.argmax(is_own, axis=1)
    rows = [{"id": s.id, "image": str(s.image), "prediction": captions[int(order[i][0])][1],
             "references": s.references, "rank": int(ranks[i]) + 1} for i, s in enumerate(done)]
    return metrics, rows

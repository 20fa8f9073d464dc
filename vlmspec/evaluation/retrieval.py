"""Image-text retrieval recall@k from embeddings, as the COCO/Flickr30k retrieval literature reports it.

Several captions describe each image (5 in COCO). Image->text: a query image scores a hit at k when any
of its own captions is among the k captions most similar to it. Text->image: every caption is a query and
hits when its image is among the k most similar images. Similarity is cosine. Recall is in percent.

Ties are broken towards the lower index (a stable sort), so that a degenerate embedding (all equal) gives
a defined, reproducible number rather than a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D matrix, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def cosine_similarity(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """`[n_images x n_texts]` cosine similarities of two embedding matrices (rows are items)."""
    a, b = _normalise(images), _normalise(texts)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"image embeddings have width {a.shape[1]} but text embeddings {b.shape[1]}")
    return a @ b.T


def recall_at_k(similarity: np.ndarray, text_to_image: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k both ways from an `[n_images x n_texts]` similarity matrix.

    `text_to_image[j]` is the index of the image that caption j describes. Keys: `i2t_r{k}` and `t2i_r{k}`,
    in percent. Images that no caption describes take no part in image->text recall.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    n_img, n_txt = sim.shape
    owner = np.asarray(text_to_image, dtype=np.int64)
    if owner.shape != (n_txt,):
        raise ValueError(f"{n_txt} captions but {owner.shape[0]} caption->image indices")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError("a caption->image index is outside the image list")
    out: dict[str, float] = {}
    # image -> text: the best rank among the image's own captions.
    order = np.argsort(-sim, axis=1, kind="stable")            # [n_img x n_txt] caption indices, best first
    rank_of = np.empty_like(order)
    rows = np.arange(n_img)[:, None]
    rank_of[rows, order] = np.arange(n_txt)[None, :]
    best = np.full(n_img, np.iinfo(np.int64).max)
    np.minimum.at(best, owner, rank_of[owner, np.arange(n_txt)])
    with_captions = best < np.iinfo(np.int64).max
    # text -> image: the rank of the caption's own image.
    order_t = np.argsort(-sim.T, axis=1, kind="stable")        # [n_txt x n_img]
    rank_t = np.argmax(order_t == owner[:, None], axis=1) if n_txt else np.zeros(0, dtype=np.int64)
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float(np.mean(best[with_captions] < k)) if with_captions.any() else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float(np.mean(rank_t < k)) if n_txt else 0.0
    return out


def retrieval_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k (percent) both ways from image and caption embeddings (cosine similarity)."""
    metrics = recall_at_k(cosine_similarity(image_embeddings, text_embeddings), text_to_image, ks)
    metrics["images"] = len(image_embeddings)
    metrics["captions"] = len(text_embeddings)
    return metrics

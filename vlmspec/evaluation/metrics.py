"""The evaluation metrics in one place: VQA accuracy, BLEU-4 / CIDEr-D, retrieval recall@k.

Each lives in its own module with the reasons for its details; this one only gathers them, so that
callers (the runner, the CLI, user scripts scoring their own predictions) have one import.
"""

from __future__ import annotations

from vlmspec.evaluation.captioning import caption_scores
from vlmspec.evaluation.ptb import ptb_tokenize, tokenize_caption, tokenize_captions
from vlmspec.evaluation.retrieval import cosine_similarity, recall_at_k, retrieval_scores
from vlmspec.evaluation.vqa import (
    normalize_answer,
    process_digits_articles,
    process_punctuation,
    vqa_accuracy,
    vqa_scores,
)

__all__ = [
    "caption_scores", "cosine_similarity", "normalize_answer", "process_digits_articles", "process_punctuation",
    "ptb_tokenize", "recall_at_k", "retrieval_scores", "tokenize_caption", "tokenize_captions", "vqa_accuracy",
    "vqa_scores",
]

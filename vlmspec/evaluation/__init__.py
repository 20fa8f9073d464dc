"""`vlm eval`: VQA accuracy, caption BLEU-4 / CIDEr-D and retrieval recall@k, as the benchmarks define them.

    from vlmspec.evaluation import run_eval, write_results
    results = run_eval(vlmspec.load("run/final"), "vqa", "test_vqa.jsonl")
    write_results(results, "results.json")

Importing this package does not import torch; running a model does.
"""

from __future__ import annotations

from vlmspec.evaluation.formats import EvalSample, EvalSet, read_eval_data
from vlmspec.evaluation.metrics import caption_scores, recall_at_k, retrieval_scores, vqa_accuracy, vqa_scores
from vlmspec.evaluation.runner import describe_metrics, run_eval, run_eval_server, write_results

__all__ = [
    "EvalSample", "EvalSet", "caption_scores", "read_eval_data", "recall_at_k", "retrieval_scores", "run_eval",
    "run_eval_server", "describe_metrics", "vqa_accuracy", "vqa_scores", "write_results",
]

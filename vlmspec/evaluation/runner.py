"""`vlm eval`: run a model (or an OpenAI-compatible server) over an evaluation set and score it.

The runner owns what is common to every task: reading the data (`formats`), opening images batch by batch
(a COCO split does not fit in memory as pixels), counting unreadable images as bad records under the same
`max_bad` limit, a progress bar, and one results dict that says what was measured and how (model name,
spec hash, generation settings, data files) next to the per-sample predictions and the metrics.

Generation is greedy (temperature 0) so that a result file can be reproduced; the prompt template of the
model's spec wraps each question, exactly as `vlm generate` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.batching import batches, open_batch, png_bytes, progress_bar
from vlmspec.evaluation.formats import TASKS, EvalSample, EvalSet, read_eval_data
from vlmspec.fsutil import atomic_write_text

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session

CAPTION_PROMPT = "Describe the image."
RESULTS_FORMAT = 1


# ---------------------------------------------------------------- identity of what was evaluated
def spec_hash(analysis: Any) -> str | None:
    """The hash `vlm train` records for a run (same definition), so results can be matched to runs."""
    if analysis is None:
        return None
    return hashlib.sha256(analysis.ir.model_dump_json().encode()).hexdigest()[:16]


def describe_metrics(metrics: dict[str, Any]) -> str:
    """One line a person reads: percentages (VQA accuracy, recall@k) as `98.75%`, BLEU and CIDEr-D on
    pycocoevalcap's scales (BLEU 0-1, CIDEr-D 0-10) to four places, counts as integers. The results
    JSON keeps the raw numbers."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, dict) or v is None:
            continue
        if k in ("vqa_accuracy", "video_qa_accuracy", "grounding_accuracy", "zero_shot_accuracy",
                 "chance") or re.fullmatch(r"(i2t|t2i)_r\d+", k):
            parts.append(f"{k} {float(v):.2f}%")
        elif re.fullmatch(r"bleu\d|cider", k):
            parts.append(f"{k} {float(v):.4f}")
        elif isinstance(v, float) and not v.is_integer():
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {int(v)}" if isinstance(v, int | float) else f"{k} {v}")
    scales = " (BLEU 0-1, CIDEr-D 0-10)" if any(re.fullmatch(r"bleu\d|cider", k) for k in metrics) else ""
    return ", ".join(parts) + scales


def _load(task: str, data: str, images: str | None, max_bad: int, annotations: str | None,
          image_pattern: str | None, limit: int | None) -> EvalSet:
    if task not in TASKS:
        raise user_error("E0551", f"unknown task `{task}`", help="expected one of: `caption`, `retrieval`, `vqa`")
    es = read_eval_data(data, task, images, annotations=annotations, image_pattern=image_pattern)
    if limit is not None:
        es.samples = es.samples[:limit]
    es.check(max_bad)
    if not es.samples:
        raise user_error("E0551", f"{data} has no usable {task} records")
    return es


# ---------------------------------------------------------------- scoring (shared by model and server runs)
def _score(task: str, es: EvalSet, done: list[EvalSample],
           predictions: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-sample rows for generated text (VQA answers or captions)."""
    if not done:
        raise user_error("E0551", f"no sample of {es.path} could be evaluated ({len(es.bad)} skipped)")
    if task == "vqa":
        from vlmspec.evaluation.vqa import vqa_scores

        metrics, accs = vqa_scores(predictions, [s.answers for s in done], [s.answer_type for s in done])
        rows = [{"id": s.id, "image": str(s.image), "question": s.question, "prediction": p, "answers": s.answers,
                 "accuracy": a, **({"answer_type": s.answer_type} if s.answer_type else {})}
                for s, p, a in zip(done, predictions, accs, strict=True)]
        return metrics, rows
    from vlmspec.evaluation.captioning import caption_scores

    keys = list(range(len(done)))
    metrics, per = caption_scores(dict(zip(keys, predictions, strict=True)),
                                  {k: s.references for k, s in zip(keys, done, strict=True)})
    rows = [{"id": s.id, "image": str(s.image), "prediction": p, "references": s.references, **per[k]}
            for k, s, p in zip(keys, done, predictions, strict=True)]
    return metrics, rows


def _results(task: str, es: EvalSet, data: str, images: str | None, metrics: dict[str, Any],
             rows: list[dict[str, Any]], generation: dict[str, Any] | None, **identity: Any) -> dict[str, Any]:
    from vlmspec import __version__

    return {
        "format": RESULTS_FORMAT, "vlmspec": __version__, "task": task, **identity,
        "data": str(data), "images": str(images) if images else None,
        "generation": generation, "metrics": metrics,
        "samples": rows, "skipped": [{"where": b.where, "reason": b.reason} for b in es.bad],
    }


# ---------------------------------------------------------------- a model in this process
#: the longest answer a generative task asks for unless told (grounding: see `answer_budget`)
DEFAULT_NEW_TOKENS = 16
#: a grounding answer over a server, whose tokenizer the client does not know: room for a box and its phrase
SERVER_BOX_TOKENS = 64


def answer_budget(session: Session, task: str) -> int:
    """New tokens a task's answers may take when the caller names none: 16, or for grounding enough for one box
    in the model's declared format with its tokenizer (16 would cut a byte-tokenized box in half)."""
    if task != "grounding":
        return DEFAULT_NEW_TOKENS
    decl = session.analysis.ir.settings.boxes
    if decl is not None and session.tokenizer is not None:
        from vlmspec.runtime.grounding import box_token_budget

        return max(DEFAULT_NEW_TOKENS, box_token_budget(decl, session.tokenizer))
    return DEFAULT_NEW_TOKENS


def run_eval(session: Session, task: str, data: str, images: str | None = None, batch_size: int = 16,
             max_new_tokens: int | None = None, max_bad: int = 0, progress: bool = True, *, prompt: str | None = None,
             annotations: str | None = None, image_pattern: str | None = None,
             limit: int | None = None, classes: list[str] | None = None,
             zero_shot_prompt: str | None = None) -> dict[str, Any]:
    """Evaluate a session's model (from `vlmspec.load`) on `data` for `task` (vqa, caption, retrieval, video_qa,
    zero_shot or grounding). `max_new_tokens`: None gives `answer_budget`'s.

    `images`: the folder image paths are relative to (default: the data file's folder). `prompt`: the
    captioning instruction (default "Describe the image."). `annotations` / `image_pattern`: see
    `formats.read_eval_data`. `limit`: evaluate the first N samples only (a quick look).
    Returns the results dict (see `write_results`); raises `E0550` when more than `max_bad` records,
    unreadable images included, had to be skipped.
    """
    identity = {"model": session.name, "spec_hash": spec_hash(session.analysis), "server": None}
    if max_new_tokens is None:
        max_new_tokens = answer_budget(session, task)
    if task == "zero_shot":  # a contrastive model's image embeddings against class prompts: `zero_shot.py`
        from vlmspec.evaluation.zero_shot import DEFAULT_PROMPT, run_zero_shot

        zs, metrics, rows = run_zero_shot(session, data, images, batch_size, max_bad, progress, classes,
                                          zero_shot_prompt, limit)
        return _results(task, zs, data, images, metrics, rows, {"batch_size": batch_size, "similarity": "cosine",
                        "prompt": zero_shot_prompt or DEFAULT_PROMPT}, **identity)
    if task != "retrieval":  # the other tasks generate text, which a contrastive model cannot
        from vlmspec.runtime.contrastive import refuse_generation

        refuse_generation(getattr(session, "model", None), f"vlm eval --task {task}")
    if task == "video_qa":  # videos and lettered options: `video_qa.py`
        from vlmspec.evaluation.video_qa import INSTRUCTION, run_video_qa

        vs, metrics, rows = run_video_qa(session, data, images, max_new_tokens, max_bad, progress, limit)
        return _results(task, vs, data, images, metrics, rows, {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                        "decoding": "greedy", "batch_size": 1, "options": "lettered, then: " + INSTRUCTION},
                        **identity)
    if task == "grounding":  # boxes read in the spec's declared format: `grounding.py`
        from vlmspec.evaluation.grounding import IOU_THRESHOLD, run_grounding

        gs, metrics, rows = run_grounding(session, data, images, max_new_tokens, max_bad, progress, limit, batch_size)
        return _results(task, gs, data, images, metrics, rows, {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                        "decoding": "greedy", "batch_size": batch_size, "iou_threshold": IOU_THRESHOLD,
                        "box": session.analysis.ir.settings.boxes.to_vlm()}, **identity)
    es = _load(task, data, images, max_bad, annotations, image_pattern, limit)
    if task == "retrieval":
        from vlmspec.evaluation.embeddings import run_retrieval

        metrics, rows = run_retrieval(session.model, session.require_processor(), es, batch_size, max_bad, progress)
        return _results(task, es, data, images, metrics, rows, {"batch_size": batch_size,
                                                                "pooling": "mean over tokens", "similarity": "cosine"},
                        **identity)
    from vlmspec.runtime.inference import answer

    text = prompt or CAPTION_PROMPT
    done: list[EvalSample] = []
    predictions: list[str] = []
    with progress_bar(progress, len(es.samples), f"eval {task}") as advance:
        for chunk in batches(es.samples, batch_size):
            kept, imgs = open_batch(chunk, es.bad)
            es.check(max_bad)   # stop once unreadable images pass the limit, not at the end
            if kept:
                prompts = [s.question or "" for s in kept] if task == "vqa" else [text] * len(kept)
                predictions += answer(session, prompts, imgs, max_new_tokens=max_new_tokens, temperature=0.0,
                                      batch_size=len(kept))
                done += kept
            advance(len(chunk))
    metrics, rows = _score(task, es, done, predictions)
    template = session.analysis.ir.settings.prompt
    generation = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "decoding": "greedy",
                  "batch_size": batch_size, **({"prompt": text} if task == "caption" else {}),
                  **({"prompt_template": template} if isinstance(template, str) else {})}
    return _results(task, es, data, images, metrics, rows, generation, **identity)


# ---------------------------------------------------------------- an OpenAI-compatible server
def run_eval_server(url: str, task: str, data: str, images: str | None = None, batch_size: int = 16,
                    max_new_tokens: int | None = None, max_bad: int = 0, progress: bool = True, *,
                    prompt: str | None = None, model: str | None = None, timeout: float = 120.0,
                    annotations: str | None = None, image_pattern: str | None = None, limit: int | None = None,
                    api_key: str | None = None) -> dict[str, Any]:
    """Evaluate a server that speaks `POST {url}/v1/chat/completions` (vLLM, `vlm serve`, ...).

    Each sample is one chat request with the question (or captioning prompt) and the image as a PNG
    data URL, `temperature=0`; up to `batch_size` requests are in flight at once. Same data readers and
    metrics as `run_eval`. Retrieval needs embeddings, which a chat API does not give, so it is refused.
    `api_key` is sent as `Authorization: Bearer KEY` and kept out of the results.
    """
    from concurrent.futures import ThreadPoolExecutor

    from vlmspec.evaluation.server import ChatClient

    if max_new_tokens is None:
        max_new_tokens = SERVER_BOX_TOKENS if task == "grounding" else DEFAULT_NEW_TOKENS
    client = ChatClient(url, model=model, timeout=timeout, api_key=api_key)
    if task == "video_qa":  # each video as a `video_url` part: `video_qa.py`
        from vlmspec.evaluation.video_qa import run_video_qa_server

        vs, metrics, rows = run_video_qa_server(client, data, images, max_new_tokens, max_bad, progress, limit,
                                                concurrency=batch_size)
        return _results(task, vs, data, images, metrics, rows,
                        {"max_new_tokens": max_new_tokens, "temperature": 0.0, "decoding": "greedy (server)",
                         "concurrency": batch_size}, model=client.served_model or model, spec_hash=None, server=url)
    if task == "retrieval":
        raise user_error("E0554", "retrieval needs image and text embeddings, which a chat completions server "
                         "does not give", help="evaluate retrieval on the model folder instead of --server")
    if task == "grounding":  # the boxes of each message's `boxes` field (`vlm serve`): `grounding.py`
        from vlmspec.evaluation.grounding import run_grounding_server

        gs, metrics, rows = run_grounding_server(client, data, images, max_new_tokens, max_bad, progress, limit,
                                                 concurrency=batch_size)
        return _results(task, gs, data, images, metrics, rows,
                        {"max_new_tokens": max_new_tokens, "temperature": 0.0, "decoding": "greedy (server)",
                         "concurrency": batch_size, "box": "the server's `boxes` field"},
                        model=client.served_model or model, spec_hash=None, server=url)
    es = _load(task, data, images, max_bad, annotations, image_pattern, limit)
    text = prompt or CAPTION_PROMPT
    done: list[EvalSample] = []
    predictions: list[str] = []
    with progress_bar(progress, len(es.samples), f"eval {task} @ {url}") as advance, \
            ThreadPoolExecutor(max_workers=max(1, batch_size)) as pool:
        for chunk in batches(es.samples, batch_size):
            kept, pngs = open_batch(chunk, es.bad, png_bytes)
            es.check(max_bad)   # stop once unreadable images pass the limit, not at the end
            prompts = [s.question or "" for s in kept] if task == "vqa" else [text] * len(kept)
            predictions += list(pool.map(lambda qp: client.complete(qp[0], qp[1], max_new_tokens),
                                         zip(prompts, pngs, strict=True)))
            done += kept
            advance(len(chunk))
    metrics, rows = _score(task, es, done, predictions)
    generation = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "decoding": "greedy (server)",
                  "concurrency": batch_size, **({"prompt": text} if task == "caption" else {})}
    return _results(task, es, data, images, metrics, rows, generation, model=client.served_model or model,
                    spec_hash=None, server=url)


# ---------------------------------------------------------------- output
def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; they become null so that every JSON reader accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the results as JSON, atomically (a crash never leaves half a file beside earlier results)."""
    target = Path(path)
    atomic_write_text(target, json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n")
    return target

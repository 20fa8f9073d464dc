"""`vlm eval --task zero_shot`: classify images by their nearest class prompt, as CLIP evaluates.

Data: JSONL records `{"image": PATH, "label": NAME}` (what `vlm data synth` writes as
`test_zero_shot.jsonl`: each image's colour). The classes are the set of labels (or `--classes`), each
written into a prompt template (default "a photo of a {label}."); an image's prediction is the class
whose prompt embedding is most similar to the image embedding. Only a contrastive model has the one
embedding space this needs; a generative model is refused.

Reported: top-1 accuracy (percent), the chance level (1 / number of classes), and per class how many
images there were and how many were right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.batching import batches, open_batch, progress_bar
from vlmspec.evaluation.embeddings import _token_batch, image_embeddings, text_embeddings
from vlmspec.evaluation.formats import BadRecord, EvalSample, EvalSet, jsonl_records

DEFAULT_PROMPT = "a photo of a {label}."


def read_zero_shot(data: str | Path, images: str | Path | None = None) -> tuple[EvalSet, list[str]]:
    """(samples, each sample's label); a record without an image or a string label is a bad record."""
    path = Path(data)
    base = Path(images) if images else path.parent
    es = EvalSet("zero_shot", str(path))
    labels: list[str] = []
    for where, n, rec in jsonl_records(path, es.bad):
        if not isinstance(rec.get("image"), str) or not isinstance(rec.get("label"), str):
            es.bad.append(BadRecord(where, "a zero-shot record needs `image` and a string `label`"))
            continue
        image = Path(rec["image"])
        es.samples.append(EvalSample(id=rec.get("id", n - 1), image=image if image.is_absolute() else base / image,
                                     where=where))
        labels.append(rec["label"])
    return es, labels


def check_contrastive(model: Any) -> None:
    from vlmspec.runtime.contrastive import ContrastiveModel

    if not isinstance(model, ContrastiveModel):
        raise user_error("E0619", "zero-shot classification compares images with class prompts in one embedding "
                         "space, and this model is generative (it has no contrastive head)",
                         help="evaluate a contrastive model (`fusion contrastive(img + txt)`), or ask this one "
                         "with `--task vqa`")


def run_zero_shot(session: Any, data: str, images: str | None, batch_size: int, max_bad: int, progress: bool,
                  classes: list[str] | None = None, prompt: str | None = None,
                  limit: int | None = None) -> tuple[EvalSet, dict[str, Any], list[dict[str, Any]]]:
    check_contrastive(session.model)
    template = prompt or DEFAULT_PROMPT
    if "{label}" not in template:
        raise user_error("E0619", f"the zero-shot prompt `{template}` has no `{{label}}` to put the class name in",
                         help=f'e.g. --prompt "{DEFAULT_PROMPT}"')
    es, labels = read_zero_shot(data, images)
    if limit is not None:
        es.samples, labels = es.samples[:limit], labels[:limit]
    es.check(max_bad)
    names = list(dict.fromkeys(classes)) if classes else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise user_error("E0619", f"labels {unknown[:5]} are not among the classes {names}",
                         help="list every label in --classes, or leave --classes out (the labels' set)")
    if len(names) < 2 or not es.samples:
        raise user_error("E0551", f"{data} has no zero-shot records with at least 2 classes")
    processor = session.require_processor()
    model = session.model
    label_of = {id(s): lab for s, lab in zip(es.samples, labels, strict=True)}
    class_vecs = text_embeddings(model, *_token_batch(processor, [template.replace("{label}", c) for c in names]))
    done: list[EvalSample] = []
    vecs: list[np.ndarray] = []
    with progress_bar(progress, len(es.samples), "eval zero_shot") as advance:
        for chunk in batches(es.samples, batch_size):
            kept, imgs = open_batch(chunk, es.bad)
            es.check(max_bad)
            if kept:
                pixels, facts = processor.images(imgs)
                vecs.append(image_embeddings(model, pixels, processor.image_kwargs(facts)))
                done += kept
            advance(len(chunk))
    if not done:
        raise user_error("E0551", f"no image of {es.path} could be evaluated ({len(es.bad)} skipped)")
    sims = np.concatenate(vecs) @ class_vecs.T  # both normalised: cosine similarity
    predicted = [names[int(k)] for k in sims.argmax(axis=1)]
    truth = [label_of[id(s)] for s in done]
    right = [p == t for p, t in zip(predicted, truth, strict=True)]
    per_class = {c: {"images": sum(t == c for t in truth),
                     "correct": sum(r for r, t in zip(right, truth, strict=True) if t == c)} for c in names}
    metrics = {"zero_shot_accuracy": 100.0 * sum(right) / len(done), "chance": 100.0 / len(names),
               "classes": len(names), "images": len(done), "per_class": per_class}
    rows = [{"id": s.id, "image": str(s.image), "label": t, "prediction": p, "correct": r}
            for s, t, p, r in zip(done, truth, predicted, right, strict=True)]
    return es, metrics, rows

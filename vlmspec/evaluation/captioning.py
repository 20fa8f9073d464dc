"""Caption metrics BLEU-4 and CIDEr-D, computed by pycocoevalcap's own scorers on COCO-tokenised text.

The scorers are the kept implementation (`pycocoevalcap.bleu.bleu.Bleu`, `pycocoevalcap.cider.cider.Cider`,
pure Python) so that numbers are the ones papers report; only the tokenisation, which pycocoevalcap does
with a Java jar, is replaced by `vlmspec.evaluation.ptb` (same output on caption text, no JVM).

Scales are pycocoevalcap's: BLEU in [0, 1], CIDEr-D in [0, 10] (papers often print both x100).
CIDEr-D weighs n-grams by their document frequency over the evaluated set, so a set of one image scores
0 whatever the caption: evaluate a whole split, not single examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmspec.diagnostics import user_error
from vlmspec.evaluation.ptb import tokenize_caption


def _scorers() -> tuple[Any, Any]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise user_error("E0552", "caption metrics need pycocoevalcap, which is not installed",
                         help="pip install 'vlmspec[eval]' (or pip install pycocoevalcap==1.2)") from None
    return Bleu(4), Cider()


def caption_scores(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]],
                   tokenized: bool = False) -> tuple[dict[str, float], dict[Any, dict[str, float]]]:
    """BLEU-1..4 and CIDEr-D of one predicted caption per key against that key's reference captions.

    Returns the corpus-level metrics and, per key, that key's BLEU-4 and CIDEr-D. `tokenized=True` takes
    captions that are already tokenised (as pycocoevalcap's `PTBTokenizer` returns them).
    """
    if set(predictions) != set(references):
        missing = sorted(map(str, set(references) - set(predictions)))[:3]
        extra = sorted(map(str, set(predictions) - set(references)))[:3]
        raise ValueError(f"predictions and references differ in keys (missing {missing}, extra {extra})")
    if not predictions:
        return {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "cider": 0.0, "images": 0}, {}
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"no reference caption for {key!r}")
    tok = (lambda s: s) if tokenized else tokenize_caption
    # Keys are strings for the scorers (they sort and compare them); the order is that of `predictions`.
    keys = list(predictions)
    res = {str(i): [tok(predictions[k])] for i, k in enumerate(keys)}
    gts = {str(i): [tok(r) for r in references[k]] for i, k in enumerate(keys)}
    bleu, cider = _scorers()
    bleu_all, bleu_each = bleu.compute_score(gts, res, verbose=0)
    cider_all, cider_each = cider.compute_score(gts, res)
    metrics = {f"bleu{n + 1}": float(bleu_all[n]) for n in range(4)}
    metrics["cider"] = float(cider_all)
    metrics["images"] = len(keys)
    # Both scorers walk the same dict in the same order, so the i-th per-image score is key i's.
    order = list(gts)
    per_key = {keys[int(k)]: {"bleu4": float(bleu_each[3][j]), "cider": float(cider_each[j])}
               for j, k in enumerate(order)}
    return metrics, per_key

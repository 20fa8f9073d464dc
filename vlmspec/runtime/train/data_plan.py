"""What a stage's data costs in image tokens, read from the images' headers: the per-sample counts a plan
(`vlm train --dry-run`) prints beside the memory estimate, since an any-resolution model's sequence length
follows its images' sizes (LLaVA-NeXT: 1,176 to 2,928 tokens per image), not one number of the spec. The
longest sample is the sequence the activation estimate uses (`DataPlan.sequence`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmspec.compiler.activations import DEFAULT_TEXT_TOKENS, Sequence
from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.ir import Stage
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.inputs.data import read_dataset
from vlmspec.runtime.inputs.token_count import ImageTokens
from vlmspec.runtime.train.stage_data import stage_data

#: samples read per stage: enough for the range and the mean, bounded for very large sets
MAX_SAMPLES = 20000


@dataclass(frozen=True, slots=True)
class DataPlan:
    """A stage's data: how many samples, how many were read, and their image tokens per sample."""

    path: str
    samples: int
    read: int
    fewest: int
    most: int
    mean: float
    over_context: int  # samples whose image tokens alone exceed the language model's context
    sequence: Sequence  # the longest sample in the language model (image + text tokens, within the context)


def data_plan(analysis: Analysis, stage: Stage, data: str | None, images: str | None,
              tokenizer: str | None = None) -> DataPlan | str:
    """The stage's data plan, or why there is none (a plan without data is still a plan: it says so).

    Text tokens are counted with `tokenizer` (a folder), else the language model's own weights folder's
    tokenizer when it has one; without either the longest sequence is bounded by the context instead."""
    if data is None and stage.data is None:
        return "none given (pass --data to count each sample's image tokens)"
    try:
        path, fmt, image_dir = stage_data(stage, data, images)
    except UserInputError as e:
        return e.diagnostics[0].message
    if not Path(path).is_file():
        return f"{path} not found"
    counter = ImageTokens(analysis)
    needs_image = counter.cfg is not None
    ds = read_dataset(path, fmt, image_dir, needs_image=needs_image)
    tok = _tokenizer(analysis, tokenizer)
    counts, lengths = [], []
    for s in ds.samples[:MAX_SAMPLES]:
        text = _text_tokens(tok, s.turns) if tok is not None else 0
        if s.image is None or not needs_image:
            counts.append(0)
            lengths.append(text)
            continue
        with Image.open(s.image) as im:  # the header only: no pixel is decoded
            width, height = im.size
        counts.append(counter(height, width))
        lengths.append(counts[-1] + text)
    if not counts:
        return f"{path} holds no samples"
    lm = analysis.ir.language.config if analysis.ir.language else None
    context = stage.max_length or analysis.ir.settings.max_length or (lm.max_positions if lm else 0)
    longest = max(range(len(counts)), key=lambda i: lengths[i])
    if tok is not None:
        tokens = min(lengths[longest], context) if context else lengths[longest]
        source = f"the longest sample: {counts[longest]:,} image + {lengths[longest] - counts[longest]:,} text tokens"
        if tokens < lengths[longest]:
            source += f", truncated to {context:,}"
    else:  # no tokenizer: the text is bounded by the context the samples are truncated to
        tokens = context or max(counts) + DEFAULT_TEXT_TOKENS
        source = (f"{max(counts):,} image tokens (the most) and text up to the context {context:,} "
                  "(an upper bound: no tokenizer to count the text)" if context else
                  f"{max(counts):,} image + {DEFAULT_TEXT_TOKENS} text tokens assumed (no tokenizer)")
    sequence = Sequence(tokens, min(max(counts), tokens), source)
    return DataPlan(path, len(ds.samples), len(counts), min(counts), max(counts), sum(counts) / len(counts),
                    sum(1 for c in counts if context and c >= context), sequence)


def _tokenizer(analysis: Analysis, folder: str | None):
    """The tokenizer to count text with: `folder`, else the LM's local weights folder's; None without one."""
    from vlmspec.runtime.weights.hf_folder import folder_tokenizer

    lm = analysis.ir.language
    weights = getattr(lm.config, "weights", None) if lm is not None else None
    for candidate in (folder, weights):
        if isinstance(candidate, str) and Path(candidate).is_dir():
            try:
                tok = folder_tokenizer(candidate)
            except Exception:  # noqa: BLE001 - a plan without text counts is still a plan
                tok = None
            if tok is not None:
                return tok
    return None


def _text_tokens(tok, turns: list[tuple[str, str]]) -> int:
    """Tokens of a sample's questions and answers (the prompt template's few extra tokens left out)."""
    return sum(len(tok(q + a, add_special_tokens=False)["input_ids"]) for q, a in turns) + 2

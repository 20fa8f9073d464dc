"""Inputs of a contrastive model: images through the vision tower's transform, captions to fixed-length ids.

A contrastive model has no prompt template and no image placeholder, so the generative `Processor` does
not apply. Captions are tokenised with the tokenizer's own special tokens (CLIP's adds BOS and EOS,
SigLIP's EOS), ended with the end-of-text token when the tokenizer adds none (CLIP's text tower pools
there), cut to the text tower's `max_positions` keeping that end, and padded to it (both CLIP and SigLIP
were trained on fixed-length text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import user_error
from vlmspec.runtime.inputs.encoder_images import encoders_transform


class ContrastiveProcessor:
    """The duck-typed subset of `Processor` that training and evaluation read, for a contrastive model."""

    instruction_tokenizer = None
    native = None
    laid_out = None

    def __init__(self, analysis: Analysis, tokenizer: Any):
        self.analysis = analysis
        self.tokenizer = tokenizer
        self.transform = encoders_transform(analysis.ir.by_role("vision"))
        text = analysis.ir.by_role("text")[0].config
        self.max_length = int(getattr(text, "max_positions", 77))
        self.vocab = int(getattr(text, "vocab", 1 << 30))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.pad_id

    @property
    def image_transform(self) -> Any:
        return self.transform

    def images(self, images: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.transform is None or not images:
            return None, None
        return self.transform.batch(list(images))

    def image_kwargs(self, facts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def stack(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.transform.stack(list(items))

    def caption_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids if len(ids) <= self.max_length else [*ids[: self.max_length - 1], self.eos_id]

    def captions(self, texts: Sequence[str] | Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions (text, or ids from `caption_ids`) -> (input_ids, attention_mask), `[b x max_positions]`."""
        rows = [self.caption_ids(t) if isinstance(t, str) else list(t) for t in texts]
        top = max(max(r) for r in rows)
        if top >= self.vocab:
            raise user_error("E0617", f"the tokenizer's id {top} does not fit the text tower's vocabulary "
                             f"({self.vocab})", help=f"set the text tower's `vocab = {top + 1}` (or more), or use "
                             "a tokenizer with a smaller vocabulary")
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

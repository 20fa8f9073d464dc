"""Text in, text out: prompts and images through the model's processor, `generate`, and decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlmspec.diagnostics import user_error
from vlmspec.runtime.devices import move

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session


def answer(session: Session, prompts: Sequence[str], images: Sequence[Any] | None = None, *,
           max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
           seed: int | None = None, batch_size: int = 16) -> list[str]:
    """One answer per prompt (each with its image, when given), batched with left padding. Without images
    the prompts are text only, as a chat request without an image is to the server: one rule for both."""
    processor = session.require_processor()
    if images is not None and len(images) != len(prompts):
        raise user_error("E0505", f"{len(prompts)} prompts but {len(images)} images")
    stop_ids = session.facts.stop_ids
    model = session.model
    outputs: list[str | None] = [None] * len(prompts)
    # a dynamic-resolution encoder batches images of one size at a time; the answers keep the prompts' order
    groups = processor.size_groups(images) if images is not None else [list(range(len(prompts)))]
    for group in groups:
        for i in range(0, len(group), batch_size):
            index = group[i:i + batch_size]
            chunk = [prompts[j] for j in index]
            imgs = [images[j] for j in index] if images is not None else None
            batch = move(processor.generation_batch(chunk, imgs), session.device)
            with torch.no_grad():
                new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                                     num_beams=num_beams, eos_token_id=list(stop_ids), seed=seed)
            for j, row in zip(index, new.tolist(), strict=True):
                kept = []
                for t in row:
                    if t in stop_ids:
                        break
                    kept.append(t)
                outputs[j] = processor.decode(kept)
    return [o if o is not None else "" for o in outputs]

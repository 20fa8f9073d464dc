"""What a whole-VLM checkpoint format declares: the `model_type` values it reads, its parts and their
key layouts, which spec component reads which part, and the function that writes the spec text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmspec.runtime.weights.families import MultiFamily, lay

# Where transformers keeps a VLM's language model: `language_model.model.*` in older saves,
# `model.language_model.*` (with a top-level `lm_head`) since transformers 4.52.
LLAVA_LM = (lay(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
            lay(("model.language_model.", "model."), ("lm_head.", "lm_head.")))

# config.json -> (component blocks of the spec, image token id or None)
Reader = Callable[[dict[str, Any], str], tuple[list[str], int | None]]


@dataclass(frozen=True, slots=True)
class VLMFormat:
    """One Hugging Face VLM layout. `components` maps the spec's component names (those `read` may
    write) to the checkpoint's parts, so `import_hf` can report each component's key layout."""

    model_types: tuple[str, ...]
    family: MultiFamily
    components: dict[str, str]
    read: Reader

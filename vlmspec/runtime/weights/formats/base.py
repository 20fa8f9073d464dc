"""What a whole-VLM checkpoint format declares: the `model_type` values it reads, its parts and their
key layouts, which spec component reads which part, the function that writes the spec text, and (for
`vlm export-hf`) the function that writes a spec-built model back in the format."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.errors import EXPORT, weights_error
from vlmspec.runtime.weights.families import Layout, MultiFamily, lay

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

# Where transformers keeps a VLM's language model: `language_model.model.*` in older saves,
# `model.language_model.*` (with a top-level `lm_head`) since transformers 4.52.
LLAVA_LM = (lay(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
            lay(("model.language_model.", "model."), ("lm_head.", "lm_head.")))

# config.json -> (component blocks of the spec, image token id or None)
Reader = Callable[[dict[str, Any], str], tuple[list[str], int | None]]


@dataclass(frozen=True, slots=True)
class Export:
    """A spec-built model in a format: `config.json`, each component's key layout (bound to that config
    by the exporter; the layout `save_pretrained` of the installed transformers writes, so an import ->
    export round trip gives the same keys), the processor files (name -> JSON) and folders copied in
    (name in the export -> source, e.g. InstructBLIP's `qformer_tokenizer/`). `chat_template`: the format's
    own `chat_template.jinja` where its processor lays prompts out itself (BLIP-2 puts the image tokens
    first, PaliGemma adds BOS and a newline), so that `apply_chat_template` yields vlmspec's ids; None:
    the exporter's, written from the spec's settings."""

    config: dict[str, Any]
    layouts: dict[str, Layout]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    copies: dict[str, Path] = field(default_factory=dict)
    chat_template: str | None = None


# the built model -> the format's checkpoint; raises E0586 (`does_not_fit`) naming what does not fit
Writer = Callable[["Session"], Export]


@dataclass(frozen=True, slots=True)
class VLMFormat:
    """One Hugging Face VLM layout. `components` maps the spec's component names (those `read` may
    write) to the checkpoint's parts, so `import_hf` can report each component's key layout. `claims`
    says (from the architecture alone) whether a spec is this format's to export, and `write` exports
    it; a format without `write` is import-only."""

    model_types: tuple[str, ...]
    family: MultiFamily
    components: dict[str, str]
    read: Reader
    claims: Callable[[ModelIR], bool] | None = None
    write: Writer | None = None
    hf_class: str = ""
    # what the folder's processor is and how its prompts are laid out (docs/weights.md's format table)
    processor: str = ""
    chat_template: str = ""


def does_not_fit(cond: bool, fmt: str, what: str, hint: str) -> None:
    """E0586 unless `cond`: one line naming what of the spec the format `fmt` cannot hold."""
    if not cond:
        raise weights_error(EXPORT, f"export-hf: {what} does not fit the {fmt} layout", help=hint)


def unplaced_attribute(config: Any, carried: set[str], fixed: dict[str, Any] | None = None) -> str | None:
    """`name = value` of the first attribute of a component's config that a format has no place for, else
    None. Every attribute not `carried` into the format's config must hold the value the format fixes:
    `fixed[name]`, else the kind's default. Checked against the schema's fields, so an attribute a kind
    gains later is refused until a format carries it, never silently dropped."""
    from vlmspec.compiler.schema.base import fmt_value

    fixed = fixed or {}
    for name, info in type(config).model_fields.items():
        if name in carried:
            continue
        want = fixed[name] if name in fixed else info.get_default(call_default_factory=True)
        value = getattr(config, name)
        if value != want:
            return f"{name} = {fmt_value(value)}"
    return None


def refuse_unplaced(comp: Component, fit: Callable[[bool, str], None], carried: set[str],
                    fixed: dict[str, Any] | None = None) -> None:
    """E0586 (through the format's `fit`) naming the first attribute of `comp` its config has no place for."""
    loose = unplaced_attribute(comp.config, carried, fixed)
    fit(loose is None, f"{comp.role} `{comp.name}` with {loose}")


def special_token_ids(session: Session) -> dict[str, Any]:
    """The tokenizer's BOS and pad ids and the spec's stop ids (eos first) as a text config's
    `bos_token_id` / `eos_token_id` / `pad_token_id`: what a format whose `generate` runs its language
    model's own generation config (BLIP-2) stops at."""
    tok = session.tokenizer
    if tok is None:
        return {}
    stops = list(session.facts.stop_ids)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
           "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}

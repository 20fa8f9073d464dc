"""One owner for what a built model needs at run time: `Session`.

A spec says which weights a component loads, which tokenizer reads prompts, which token stands for an
image and where generation stops. Every command needs those facts, and when each derived them again
from the analysis and the tokenizer the copies disagreed: `vlm train` built random towers where `vlm
build` loaded the spec's `weights`, and `vlm train --tokenizer` skipped the special tokens `vlm build`
added. Here they are derived once:

- `build_session(analysis, ...)` is the one code path from a checked spec to a model: it always
  honours `weights` (with a coverage report), `dtype` and `quantize`, and finds the tokenizer (the
  given one, else the language model's `tokenizer` or `weights` folder) with the spec's special tokens.
- `load_session(source)` is the same for a folder written by `vlm build` / `vlm train`.
- `Session` holds the model, the analysis, the tokenizers, the processor, the parameter table and the
  run-time facts (`RunFacts`); `vlm build`, `train`, `generate`, `serve`, `eval`, `export` and
  `vlmspec.load` all receive one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis, load_analysis
from vlmspec.compiler.passes import weights_location
from vlmspec.diagnostics import SpecValidationError, VlmSpecError, user_error
from vlmspec.runtime.checkpoint import FOLDER_WEIGHTS, INSTRUCTION_TOKENIZER, load_state, read_config
from vlmspec.runtime.devices import model_device
from vlmspec.runtime.inputs.processor import Processor
from vlmspec.runtime.inputs.tokenizer import (
    IMAGE_TOKEN,
    byte_tokenizer,
    ensure_special_tokens,
    load_tokenizer,
)
from vlmspec.runtime.model import VisionLanguageModel, build_model
from vlmspec.runtime.quantize import apply_quantization
from vlmspec.runtime.spec_paths import ParamTable
from vlmspec.runtime.weights import build_with_weights
from vlmspec.runtime.weights.report import CoverageReport


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What generation, serving and export read about a built model, derived once from spec + tokenizer."""

    image_token: str | None  # the in-sequence placeholder text (`<image>`), None without a fusion
    image_token_id: int | None  # its id (the model's `image_token_id`)
    stop_ids: tuple[int, ...]  # end of sequence, then the spec's `stop` tokens
    banned_id: int | None  # what generation never emits: the placeholder of an in-sequence fusion
    max_positions: int | None  # the language model's context
    weights: dict[str, str]  # component -> the checkpoint folder its `weights` names (resolved)

    @classmethod
    def derive(cls, analysis: Analysis, model: VisionLanguageModel, tokenizer: Any | None) -> RunFacts:
        ir = analysis.ir
        fusions = ir.by_role("fusion")
        image_token = getattr(fusions[0].config, "image_token", None) if fusions else None  # none: contrastive
        stops: tuple[int, ...] = ()
        if tokenizer is not None:
            ids = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(s) for s in ir.settings.stop)]
            stops = tuple(dict.fromkeys(i for i in ids if i is not None))
        image_id = getattr(model, "image_token_id", None)
        weights = {c.name: str(weights_location(c.config.weights, analysis.file)[0])
                   for c in ir.components.values() if getattr(c.config, "weights", None)}
        return cls(image_token=image_token, image_token_id=image_id, stop_ids=stops,
                   banned_id=image_id if getattr(model, "in_sequence", None) else None,
                   max_positions=ir.language.config.max_positions if ir.language is not None else None,
                   weights=weights)


class Session:
    """A built model and everything derived from its spec and tokenizer; see the module docstring."""

    def __init__(self, analysis: Analysis, model: VisionLanguageModel, tokenizer: Any | None = None,
                 instruction_tokenizer: Any | None = None, report: CoverageReport | None = None,
                 tokenizer_origin: str | None = None):
        self.analysis = analysis
        self.model = model
        self.tokenizer = tokenizer
        self.instruction_tokenizer = instruction_tokenizer
        self.report = report
        self.tokenizer_origin = tokenizer_origin  # where the tokenizer came from, for the user (`vlm build`)

    @cached_property
    def processor(self) -> Processor | None:
        """Prompts and images -> model inputs; None when there is no tokenizer to read prompts with."""
        if self.tokenizer is None:
            return None
        if self.analysis.ir.by_role("text"):  # a contrastive model: captions to fixed-length ids, no prompts
            from vlmspec.runtime.contrastive_inputs import ContrastiveProcessor

            return ContrastiveProcessor(self.analysis, self.tokenizer)  # type: ignore[return-value]
        return Processor(self.analysis, self.tokenizer, self.instruction_tokenizer)

    @cached_property
    def facts(self) -> RunFacts:
        return RunFacts.derive(self.analysis, self.model, self.tokenizer)

    @cached_property
    def params(self) -> ParamTable:
        """Parameter -> spec path table (freezing, learning rates, LoRA targets, FSDP wrapping)."""
        return ParamTable.of(self.model, self.analysis)

    @property
    def name(self) -> str:
        return self.analysis.ir.name

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are: every input is moved there (`vlmspec.runtime.devices.move`)."""
        return model_device(self.model)

    def require_processor(self) -> Processor:
        if self.processor is None:
            raise user_error("E0534", "this model folder has no tokenizer, so it cannot read prompts",
                             help="build it with `vlm build SPEC -o DIR --tokenizer TOKENIZER_DIR`, or name the "
                             "language model's `tokenizer` (or a `weights` folder holding one) in the spec")
        return self.processor

    def eval(self) -> Session:
        self.model.eval()
        return self


# ---------------------------------------------------------------- tokenizers


def tokenizer_source(analysis: Analysis, explicit: str | Path | None = None) -> Path | None:
    """Where the tokenizer comes from: the given folder, else the language model's `tokenizer`, else its
    `weights` folder when that holds one (a Hugging Face checkpoint ships its tokenizer beside it)."""
    if explicit is not None:
        return Path(explicit)
    lm = analysis.ir.language
    if lm is None:  # a contrastive model: its text tower names (or its checkpoint holds) the tokenizer
        lm = next(iter(analysis.ir.by_role("text")), None)
    if lm is None:
        return None
    named = getattr(lm.config, "tokenizer", None)
    if named:
        return weights_location(named, analysis.file)[0]
    weights = getattr(lm.config, "weights", None)
    if weights:
        folder = weights_location(weights, analysis.file)[0]
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def load_tokenizers(analysis: Analysis, source: str | Path | None) -> tuple[Any | None, Any | None]:
    """(tokenizer with the spec's special tokens, InstructBLIP's instruction tokenizer) from `source`."""
    if source is None:
        return None, None
    path = Path(source)
    tok = ensure_special_tokens(load_tokenizer(path), analysis)
    qf_dir = path / INSTRUCTION_TOKENIZER
    qf_tok = load_tokenizer(qf_dir, plain=True) if qf_dir.is_dir() else None  # a Q-Former reads BERT ids
    return tok, qf_tok


# ---------------------------------------------------------------- building


def build_session(analysis: Analysis, *, tokenizer: Any | str | Path | None = None,
                  instruction_tokenizer: Any | None = None, device: str = "cpu", seed: int | None = None,
                  dtype: torch.dtype | str | None = None, quantize: bool = True) -> Session:
    """The model a checked spec describes, its `weights` loaded, its tokenizer found; see the module docstring.

    tokenizer: a tokenizer object, or a folder (default: `tokenizer_source(analysis)`).
    seed: seeds the initialisation of the parameters no checkpoint provides.
    quantize: apply the spec's `quantize` (False for a model about to be saved: a model folder holds the
    weights unquantized, and `load_session` quantizes them as the spec says).
    """
    if tokenizer is None or isinstance(tokenizer, str | Path):
        source = tokenizer_source(analysis, tokenizer)
        tok, qf_tok = load_tokenizers(analysis, source)
        instruction_tokenizer = instruction_tokenizer or qf_tok
        origin = str(source) if source is not None else None
        if tok is None and analysis.ir.language is not None:
            # no tokenizer anywhere: bytes, so that the model can always read prompts (the vocabulary permitting)
            fusions = analysis.ir.by_role("fusion")
            extra = [IMAGE_TOKEN, *(f.config.image_token for f in fusions), *analysis.ir.settings.task_tokens]
            lm = analysis.ir.language.config
            rows = lm.vocab + lm.extra_vocab + lm.embed_extra
            for specials in ([*extra, *template_markers(analysis)], extra):  # markers whole, if the rows allow
                candidate = byte_tokenizer(dict.fromkeys(specials))
                if len(candidate) <= rows:
                    tok, origin = ensure_special_tokens(candidate, analysis), "built-in byte-level (the spec names none)"
                    break
        elif tok is None:  # a contrastive model: its text tower reads the same built-in bytes, vocabulary permitting
            tok, origin = text_tower_tokenizer(analysis)
    else:
        tok, origin = ensure_special_tokens(tokenizer, analysis), "given"
    fusions = [f for f in analysis.ir.by_role("fusion") if hasattr(f.config, "image_token")]
    image_id = tok.convert_tokens_to_ids(fusions[0].config.image_token) if tok is not None and fusions else None
    # a pretrained language model learned its image token's row: a tokenizer that puts the token elsewhere
    # would feed it another row (a freshly initialised model has no such row, and takes the tokenizer's id)
    declared = analysis.ir.settings.image_token_id
    pretrained = analysis.ir.language is not None and getattr(analysis.ir.language.config, "weights", None)
    if image_id is not None and declared is not None and image_id != declared and pretrained:
        raise user_error("E0538", f"the tokenizer's `{fusions[0].config.image_token}` is id {image_id}, but the spec "
                         f"says image_token_id = {declared}", help="use the checkpoint's own tokenizer, or correct "
                         "`image_token_id` (prompts would place images where the model does not look)")
    if seed is not None:
        torch.manual_seed(seed)
    report = None
    if _has_weights(analysis) and device != "meta":
        model, report = build_with_weights(analysis, image_token_id=image_id, device=device, dtype=dtype)
    else:
        model = build_model(analysis, image_token_id=image_id, device=device, dtype=dtype)
    if device != "meta" and quantize:
        apply_quantization(model, analysis)
    return Session(analysis, model, tok, instruction_tokenizer, report, origin)


#: ChatML / Llama 3 turn markers (`<|im_start|>`, `<|im_end|>`, `<|eot_id|>`): one token each in a real tokenizer
_MARKER = re.compile(r"<\|[^<>|\s]+\|>")


def template_markers(analysis: Analysis) -> list[str]:
    """The turn markers of the spec's prompt, answer and system templates, in order. The built-in byte-level
    tokenizer makes each one token, as the checkpoint's tokenizer would: spelled out in bytes, the answer's
    closing `<|im_end|>` costs ten tokens to learn and shows as `<|im_` when generation is cut short."""
    s = analysis.ir.settings
    text = "\n".join(t for t in (s.system, s.prompt, s.answer) if t)
    return list(dict.fromkeys(_MARKER.findall(text)))


def text_tower_tokenizer(analysis: Analysis) -> tuple[Any | None, str | None]:
    """A contrastive spec that names no tokenizer: the byte-level one, when its text tower has the rows."""
    towers = analysis.ir.by_role("text")
    if not towers:
        return None, None
    candidate = byte_tokenizer(())
    if len(candidate) > getattr(towers[0].config, "vocab", 0):
        return None, None
    return candidate, "built-in byte-level (the spec names none)"


def _has_weights(analysis: Analysis) -> bool:
    return any(getattr(c.config, "weights", None) for c in analysis.ir.components.values())


def load_session(source: str | Path, device: str = "cpu") -> Session:
    """A folder written by `vlm build` / `vlm train`, or `spec.vlm[:model]` built fresh (weights honoured)."""
    path = Path(source)
    if not path.is_dir():
        analysis, _ = load_analysis(str(source))
        return build_session(analysis, device=device)
    config = read_config(path)
    spec = path / "spec.vlm"
    try:
        analysis, _ = load_analysis(f"{spec}:{config['model']}")
    except SpecValidationError as e:
        raise VlmSpecError(e.diagnostics, e.sources) from None
    model = build_model(analysis, image_token_id=config.get("image_token_id"), device=device)
    weights = path / FOLDER_WEIGHTS
    if not weights.is_file():
        raise user_error("E0541", f"{path} has no {FOLDER_WEIGHTS}")
    state = load_state(weights)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise user_error("E0542", f"{weights} does not fit the spec: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected tensors" + (f" (e.g. missing {missing[0]})" if missing else
                                                  f" (e.g. unexpected {unexpected[0]})"))
    model.load_state_dict(state, strict=True)
    model.eval()
    apply_quantization(model, analysis)
    has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    tok, qf_tok = (None, None)
    if has_tok:
        tok = ensure_special_tokens(load_tokenizer(path), analysis)
        qf_dir = path / INSTRUCTION_TOKENIZER
        qf_tok = load_tokenizer(qf_dir, plain=True) if qf_dir.is_dir() else None
    return Session(analysis, model, tok, qf_tok)


"""`vlm export-hf`: a vlmspec model folder -> a Hugging Face checkpoint folder that transformers loads with
`AutoProcessor` + `AutoModelForImageTextToText` and serves as it is (`transformers serve`, vLLM, SGLang).

Which format is written is the architecture's to say: each whole-VLM format under `formats/` declares
what it `claims` (LLaVA: an MLP connector into a prefix fusion; BLIP-2: a Q-Former; ...) and `write`s the
config, each component's key layout and the processor files. This module does what every format shares:
the tensors through each layout's `export` (the inverse of what import reads, so `import-hf -> build ->
export-hf` gives the checkpoint's tensors back bit for bit), tied tensors once, the tokenizer files,
`chat_template.jinja` (the spec's `chat_template` verbatim, else one written from its `prompt`, `answer`
and `system` that yields the ids vlmspec's `Processor` builds) and `generation_config.json` (the spec's
stop ids as `eos_token_id`, the image placeholder suppressed, greedy). A model no format holds is E0586
naming what does not fit. The folder is written aside and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.ir import ModelIR
from vlmspec.fsutil import fsync_dir_files, replace_dir
from vlmspec.runtime.session import Session, load_session
from vlmspec.runtime.weights.chat_template import PROMPT_TURN, conversation_template
from vlmspec.runtime.weights.errors import EXPORT, weights_error
from vlmspec.runtime.weights.formats import VLMFormat, formats

# the files `save_pretrained` writes for a tokenizer (whichever of them the model folder has); a chat
# template of the tokenizer's is not copied: the exported one says how vlmspec lays prompts out
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


def chat_template(analysis: Analysis) -> str:
    """The spec's `chat_template` setting verbatim when it has one, else one that lays a conversation out as
    `Processor.encode_turns` does: BOS, then per user message `Processor.prompt_text`'s layout (images
    first when the prompt has no `{image}`), per answer `answer` and eos. The prompt already ends where the
    answer starts, so the generation prompt adds nothing."""
    settings = analysis.ir.settings
    own = getattr(settings, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    fusions = analysis.ir.by_role("fusion")
    image_token = fusions[0].config.image_token if fusions else "<image>"
    prompt = settings.prompt if "{image}" in settings.prompt else "{image}" + settings.prompt
    return conversation_template("from the spec's prompt, answer and system settings", PROMPT_TURN,
                                 {"PROMPT": prompt, "ANSWER": settings.answer, "IMAGE_TOKEN": image_token},
                                 system=settings.system, bos_first=True)


def generation_config(session: Any) -> dict[str, Any]:
    """`generation_config.json`: stop at the spec's stop ids (eos first), never emit the in-sequence image
    placeholder (as `model.generate` bans it), greedy, up to the language model's context."""
    tok, facts = session.tokenizer, session.facts
    stops = list(facts.stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else None)
    gen: dict[str, Any] = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                           "pad_token_id": pad, "do_sample": False}
    if facts.max_positions:
        gen["max_length"] = facts.max_positions
    if facts.banned_id is not None:
        gen["suppress_tokens"] = [int(facts.banned_id)]
    return {k: v for k, v in gen.items() if v is not None and v != []}


def writers() -> dict[str, VLMFormat]:
    """Format name (its first `model_type`) -> format, for the formats that can be written."""
    out: dict[str, VLMFormat] = {}
    for fmt in formats().values():
        if fmt.write is not None:
            out.setdefault(fmt.model_types[0], fmt)
    return out


def _architecture(ir: ModelIR) -> str:
    return ", ".join(f"{c.role} {c.kind}" for c in ir.components.values())


def pick_format(ir: ModelIR, name: str | None = None) -> VLMFormat:
    """The format a model is written in: `name` when given, else the first that claims the architecture."""
    table = writers()
    if name is not None:
        if name not in table:
            raise weights_error(EXPORT, f"export-hf: no format `{name}`", help="formats: " + ", ".join(table))
        return table[name]
    for fmt in table.values():
        if fmt.claims is not None and fmt.claims(ir):
            return fmt
    raise weights_error(EXPORT, f"export-hf: no Hugging Face format holds this architecture ({_architecture(ir)})",
                        help="formats written: " + "; ".join(f"{n} ({f.hf_class})" for n, f in table.items()))


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the second name of a tied tensor (an LM head tied to the embedding): the
    checkpoint stores it once and the config's `tie_word_embeddings` ties it again on load."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for key, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def checkpoint_tensors(session: Session, written: Any, fmt: str) -> dict[str, torch.Tensor]:
    """Every component's tensors under the format's keys; E0586 for a tensor or component with no place."""
    model = session.model
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.components.items():
        state = _untied(module.state_dict())
        layout = written.layouts.get(name)
        if layout is None:
            if state:
                raise weights_error(EXPORT, f"export-hf: `{name}` ({len(state)} tensors) has no place in the {fmt} "
                                    "layout", help="export a model whose components all map to the format's parts")
            continue
        out, unplaced = layout.bind(written.config).export(state)
        if unplaced:
            raise weights_error(EXPORT, f"export-hf: `{name}.{unplaced[0]}` has no place in the {fmt} layout"
                                + (f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""),
                                help="the format stores no such tensor: export a model without it")
        for key, t in out.items():
            if key in tensors:
                raise weights_error(EXPORT, f"export-hf: two tensors map to `{key}` in the {fmt} layout")
            tensors[key] = t.detach().contiguous().cpu()
    return tensors


def export_hf(model_dir: str | Path, out_dir: str | Path, fmt: str | None = None) -> Path:
    """Write `out_dir` in the format that holds the model (or `fmt`): config, weights, tokenizer, processor
    configs, chat template, generation config; return it."""
    from safetensors.torch import save_file

    session = load_session(model_dir)
    chosen = pick_format(session.analysis.ir, fmt)
    name = chosen.model_types[0]
    written = chosen.write(session)  # type: ignore[misc]
    tensors = checkpoint_tensors(session, written, name)
    config = dict(written.config)
    if tensors:
        config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    copied = [f for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file()]
    for file in copied:
        shutil.copyfile(Path(model_dir) / file, tmp / file)
    for dest, src in written.copies.items():
        if src.is_dir():
            shutil.copytree(src, tmp / dest)
        elif src.is_file():
            shutil.copyfile(src, tmp / dest)
    if copied and session.tokenizer is not None:
        generates = getattr(session.model, "generative", True)  # a contrastive model has no prompts, no stops
        files = {**written.files, **({"generation_config.json": generation_config(session)} if generates else {})}
        for file, cfg in files.items():
            (tmp / file).write_text(json.dumps(cfg, indent=2))
        if generates:
            (tmp / "chat_template.jinja").write_text(written.chat_template or chat_template(session.analysis))
    fsync_dir_files(tmp)
    replace_dir(tmp, out)
    return out

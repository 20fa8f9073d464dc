"""`import_hf`: a Hugging Face VLM folder -> an equivalent, readable `.vlm` spec.

The spec's components point `weights` at the folder, each at its named part (`DIR#vision`, ...),
so that building the spec and loading its weights gives the same model. Each supported format (LLaVA,
BLIP-2, InstructBLIP, ...) is one module under `formats/`. Settings the spec cannot express (a rope
scaling, attention biases on the output projection, ...) are an error (E0585), never dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.errors import UNSUPPORTED, weights_error
from vlmspec.runtime.weights.formats import formats
from vlmspec.runtime.weights.hf_folder import settings as folder_settings
from vlmspec.runtime.weights.resolution import Resolved, pick_layout
from vlmspec.runtime.weights.source import CheckpointSource, read_config
from vlmspec.runtime.weights.spec_text import identifier


def import_hf(folder: str | Path, *, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Read a VLM folder; return (spec text, mapping).

    mapping: {"architecture", "model_type", "model" (the spec's model name), "image_token_id" (pass it to
    `build_model` / `build_with_weights`), "components": {name: {"weights", "family", "layout"}}}.
    """
    path = Path(folder).resolve()
    config = read_config(path)
    mt = str(config.get("model_type", ""))
    importers = formats()
    if mt not in importers:
        arch = ", ".join(config.get("architectures") or []) or mt
        raise weights_error(UNSUPPORTED, f"{path} is a `{mt}` model ({arch}); import_hf reads "
                            + ", ".join(f"`{m}`" for m in sorted(importers)),
                            help="build the spec by hand and point each component's `weights` at a single-model "
                            "checkpoint")
    model = name or identifier(f"{mt}_import")
    fmt = importers[mt]
    blocks, image_token = fmt.read(config, str(path))
    arch = ", ".join(config.get("architectures") or [mt])
    setting = f"  image_token_id = {image_token}\n" if image_token is not None else ""
    # the chat template, generation config and tokenizer beside the weights: prompts, stop tokens
    lines, notes = folder_settings(path, _image_token(blocks))
    setting += "".join(f"{line}\n" for line in lines)
    text = (f"# Imported from {path}\n# ({arch}) by vlmspec.runtime.weights.import_hf.\n"
            + "".join(f"{n}\n" for n in notes) + f"model {model} {{\n" + "\n".join(blocks) + setting + "}\n")
    from vlmspec.compiler.printer import format_text

    text = format_text(text.replace("}}\n", "}\n}\n"), "imported.vlm")
    source = CheckpointSource(path)
    keys = source.keys()
    components: dict[str, Any] = {}
    declared = set(re.findall(r"^\s*(?:vision|audio|text|connector|language)\s+(\w+)\s*=", text, flags=re.M))
    declared |= set(re.findall(r"^\s*fusion\s+(\w+)\s*\(", text, flags=re.M))  # fusions with weights
    for comp, part in fmt.components.items():
        if comp not in declared:
            continue
        found = pick_layout(Resolved(mt, fmt.family.parts[part].layouts), keys, config)
        layout = found.rules if found else None
        components[comp] = {"weights": f"{path}#{part}", "family": f"{mt}#{part}",
                            "layout": [list(r) for r in layout] if layout else None}
    return text, {"architecture": arch, "model_type": mt, "model": model, "image_token_id": image_token,
                  "components": components}


def _image_token(blocks: list[str]) -> str:
    """The image placeholder text of the spec's fusion (`image_token = "..."`, else the default `<image>`)."""
    for block in blocks:
        found = re.search(r'image_token\s*=\s*"([^"]*)"', block)
        if found:
            return found.group(1)
    return "<image>"

"""Does a component say what its checkpoint says? A spec written by hand (`weights = "DIR"`) can name a
checkpoint whose shapes fit but whose config differs: another RMSNorm epsilon, rotary base, activation
or attention bias. The weights would load and the model would silently compute something else than the
checkpoint was trained to. The import readers already turn a checkpoint's config into spec attributes;
here the same readers say what the component should be, and a difference in an attribute that changes
the computation without changing a shape is refused (E0587) before anything is read.

Only what a reader derives is compared; choices that are the spec's to make when reusing a checkpoint
(which layer's features to read, the image transform, the context length, quantization) are not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from vlmspec.compiler.schema.base import fmt_value
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.weights.errors import DISAGREES, weights_error

#: per role, the attributes a checkpoint's config fixes that no tensor shape shows
COMPARED: dict[str, tuple[str, ...]] = {
    "language": ("norm_eps", "rope_theta", "rope", "act", "qkv_bias", "partial_rotary", "head_bias", "embed_scale"),
    "vision": ("norm_eps", "act", "position", "norm", "gated_mlp", "window", "full_layers"),
    "connector": ("act", "norm"),
}


def _analysis_of(text: str) -> Any | None:
    """The checked spec of an importer's text (None when the front end refuses it)."""
    from vlmspec.compiler.compile import check_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.vlm"
        path.write_text(text)
        result = check_file(str(path))
    return result.analyses[0] if result.ok and result.analyses else None


def expected_components(folder: Path, config: dict[str, Any]) -> dict[str, Any] | UserInputError | None:
    """Part (or role, for a single-model checkpoint) -> the component the import readers write for it.
    A single-model language checkpoint whose config the reader refuses (a Mistral window shorter than
    the context: attention a `llama` does not do) gives that refusal (E0585); a whole-VLM checkpoint
    whose reader refuses some part, or one no reader covers, gives None (no comparison)."""
    from vlmspec.runtime.weights.families import FAMILIES
    from vlmspec.runtime.weights.formats import formats
    from vlmspec.runtime.weights.importer import import_hf
    from vlmspec.runtime.weights.spec_text import language_block, tie

    mt = str(config.get("model_type", ""))
    fmt = formats().get(mt)
    if fmt is not None:
        try:
            analysis = _analysis_of(import_hf(folder)[0])
        except UserInputError:  # a part the readers cannot express; the coverage check still runs
            return None
        if analysis is None:
            return None
        return {part: analysis.ir.components[name] for name, part in fmt.components.items()
                if name in analysis.ir.components}
    fam = FAMILIES.get(mt)
    if fam is None or fam.role != "language":
        return None
    try:
        block = language_block(config, str(folder), tie(config, config))
    except UserInputError as e:
        return e
    analysis = _analysis_of("model m {\n" + block + "\n}\n")
    return {"language": analysis.ir.components["llm"]} if analysis is not None else None


def check_agreement(name: str, component: Any, expected: Any, folder: Path) -> UserInputError | None:
    """E0587 for the first compared attribute where the spec's component and the checkpoint's differ."""
    if expected is None or expected.kind != component.kind:
        return None
    for field in COMPARED.get(component.role, ()):
        if not hasattr(component.config, field) or not hasattr(expected.config, field):
            continue
        ours, theirs = getattr(component.config, field), getattr(expected.config, field)
        if fmt_value(ours) != fmt_value(theirs):
            return weights_error(DISAGREES, f"`{name}.{field} = {fmt_value(ours)}` but {folder}'s config.json "
                                f"says {field} = {fmt_value(theirs)}",
                                help=f"write `{field} = {fmt_value(theirs)}` on `{name}` (the checkpoint was "
                                "trained with it); `vlm import-hf DIR` writes a whole spec from a checkpoint folder")
    return None

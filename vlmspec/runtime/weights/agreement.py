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
    if fam is not None and fam.role == "vision":
        return vision_expected(mt, config)
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


#: single-model vision checkpoints: model_type -> (the kind that reads it, its config's defaults for the
#: activation and the LayerNorm epsilon, as transformers' config classes set them)
_VISION: dict[str, tuple[str, str, float]] = {
    "clip_vision_model": ("vit", "quick_gelu", 1e-5), "clip": ("vit", "quick_gelu", 1e-5),
    "siglip_vision_model": ("siglip", "gelu_pytorch_tanh", 1e-6), "siglip": ("siglip", "gelu_pytorch_tanh", 1e-6),
    "blip_2_vision_model": ("eva", "gelu", 1e-6),
    "dinov2": ("dinov2", "gelu", 1e-6), "dinov2_with_registers": ("dinov2", "gelu", 1e-6),
    "convnext": ("convnext", "gelu", 1e-12),
}


def vision_expected(mt: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """{"vision": what a single-model vision checkpoint fixes that no tensor shows}: its activation and
    LayerNorm epsilon, as the component the spec names should have them (a whole CLIPModel / SiglipModel
    folder: its vision config). Shapes (width, depth, registers, biases, a SwiGLU FFN) the coverage check
    sees already."""
    from types import SimpleNamespace

    from vlmspec.runtime.weights.spec_text import VISION_ACT

    known = _VISION.get(mt)
    if known is None:
        return None
    kind, act, eps = known
    vc = config.get("vision_config") or config
    hidden_act = str(vc.get("hidden_act", act))
    if hidden_act not in VISION_ACT:
        return None  # an activation no kind has: the coverage and build report it
    if mt.startswith("dinov2") and vc.get("use_swiglu_ffn"):
        hidden_act = "silu"  # DINOv2's SwiGLU gates with silu whatever `hidden_act` says
    fixed = SimpleNamespace(act=VISION_ACT[hidden_act], norm_eps=float(vc.get("layer_norm_eps", eps)))
    return {"vision": SimpleNamespace(kind=kind, role="vision", config=fixed)}

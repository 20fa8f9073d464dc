"""Which family and key layouts a component's checkpoint folder resolves to: single-model families
(`families.FAMILIES`) or one part of a whole-VLM format (`formats/`). It sits above both, so that
neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmspec.runtime.weights.errors import UNSUPPORTED, WRONG_FAMILY, weights_error
from vlmspec.runtime.weights.families import FAMILIES, Layout, MultiFamily
from vlmspec.runtime.weights.formats import formats


def multi_family(model_type: str) -> MultiFamily | None:
    """The multi-part family of a VLM `model_type` (formats/ declares them, one module each)."""
    fmt = formats().get(model_type)
    return fmt.family if fmt else None


@dataclass(frozen=True, slots=True)
class Resolved:
    """What one component reads: the family's name (for messages) and its candidate layouts."""

    family: str
    layouts: tuple[Layout, ...]


def resolve(config: dict[str, Any], part: str | None, *, component: str, role: str, kind: str,
            folder: str) -> Resolved:
    """The family and layouts of a checkpoint for one component; E0583 when they do not fit."""
    mt = str(config.get("model_type", ""))
    arch = ", ".join(config.get("architectures") or []) or mt or "unknown"
    multi = multi_family(mt)
    if multi is not None:
        name = part or multi.default_part.get(role)
        if name not in multi.parts:
            raise weights_error(WRONG_FAMILY, f"{folder} ({arch}) has no part `{name}` for {role} `{component}`",
                                help="name one of its parts: " + ", ".join(f"`{folder}#{p}`" for p in multi.parts))
        p = multi.parts[name]
        kinds, family, layouts = p.kinds, f"{mt}#{name}", p.layouts
        if p.sub_config is not None:
            sub = str((config.get(p.sub_config) or {}).get("model_type", ""))
            if sub not in FAMILIES:
                raise weights_error(UNSUPPORTED, f"{folder}: part `{name}` is a `{sub}` model, which vlmspec "
                                    "cannot map", help="supported: " + ", ".join(sorted(FAMILIES)))
            kinds, family = FAMILIES[sub].kinds, f"{mt}#{name} ({sub})"
            layouts = FAMILIES[sub].part_layouts(p.layouts, p.sub_config)  # Phi-3's fused tensors
        if p.role != role or kind not in kinds:
            raise weights_error(WRONG_FAMILY, f"{role} `{component}` is a `{kind}` but {folder} part `{name}` is a "
                                f"{family} checkpoint", help=_fits(kinds))
        return Resolved(family, layouts)
    if part is not None:
        raise weights_error(WRONG_FAMILY, f"{folder} ({arch}) is a single-model checkpoint; `#{part}` names no part")
    fam = FAMILIES.get(mt)
    if fam is None:
        raise weights_error(WRONG_FAMILY, f"{role} `{component}` is a `{kind}` but {folder} is a `{mt or '?'}` "
                            f"checkpoint ({arch}), which vlmspec cannot map",
                            help="supported model_type values: " + ", ".join(sorted(FAMILIES)) + ", or a whole VLM of "
                            "a type `vlm import-hf` reads")
    if fam.role != role or kind not in fam.kinds:
        raise weights_error(WRONG_FAMILY, f"{role} `{component}` is a `{kind}` but {folder} is a `{mt}` checkpoint "
                            f"({arch})", help=_fits(fam.kinds))
    return Resolved(f"{mt} ({fam.hf_class})", fam.layouts)


def _fits(kinds: frozenset[str]) -> str:
    return "that checkpoint fits a component of kind " + " / ".join(f"`{k}`" for k in sorted(kinds))


def pick_layout(resolved: Resolved, keys: list[str], config: dict[str, Any]) -> Layout | None:
    for layout in resolved.layouts:
        if layout.present(keys):
            return layout.bind(config)
    return None

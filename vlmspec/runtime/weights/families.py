"""Which Hugging Face checkpoints fit which spec components, and how their keys map.

Every family is an explicit table row: the `model_type` values of `config.json` it accepts, the spec
kinds it can fill, and its key layouts. A layout is a list of (checkpoint prefix, component prefix)
rules; a component key `k` under component prefix `p` is read from `checkpoint_prefix + k[len(p):]`.
A family may have several layouts (transformers has saved LLaVA as `language_model.model.*` and as
`model.language_model.*`); the first layout whose anchor (first rule) prefix occurs in the checkpoint
is used. Nothing is matched by substring or by folder name.

Multi-part checkpoints (one module each under `formats/`) have named parts: a spec selects one with
`weights = "DIR#part"`; without `#part` the part follows the component's role.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vlmspec.runtime.weights.errors import UNSUPPORTED, WRONG_FAMILY, weights_error


@dataclass(frozen=True, slots=True)
class Layout:
    """(checkpoint prefix, component prefix) rules; the first rule's checkpoint prefix is the anchor."""

    rules: tuple[tuple[str, str], ...]

    def present(self, keys: Iterable[str]) -> bool:
        anchor = self.rules[0][0]
        return any(k.startswith(anchor) for k in keys)

    def to_checkpoint(self, key: str) -> str | None:
        """The checkpoint key a component key is read from (None: no rule covers it)."""
        for ckpt, ours in self.rules:
            if key.startswith(ours):
                return ckpt + key[len(ours):]
        return None

    def owns(self, ckpt_key: str) -> bool:
        """Whether a checkpoint key belongs to this part (else it is another part's, and ignored)."""
        return any(ckpt_key.startswith(ckpt) for ckpt, _ in self.rules)

    def bind(self, config: dict[str, Any]) -> Layout:
        """This layout for one checkpoint: one whose mapping depends on the checkpoint's config (which
        decoder layers are Mllama's cross-attention ones) fills it in here."""
        return self

    def convert(self, key: str, tensor: Tensor) -> Tensor:
        """The checkpoint tensor as component key `key` holds it (a layout that stores a tensor in another
        arrangement, of the same shape, rearranges it here)."""
        return tensor


def lay(*rules: tuple[str, str]) -> Layout:
    return Layout(tuple(rules))


_LM = (lay(("model.", "model."), ("lm_head.", "lm_head.")),)
_VISION = (lay(("vision_model.", "")), lay(("", "")))


@dataclass(frozen=True, slots=True)
class Family:
    """A single-model checkpoint family (CLIP vision, Llama, OPT, ...)."""

    name: str
    role: str
    kinds: frozenset[str]
    layouts: tuple[Layout, ...]
    hf_class: str


FAMILIES: dict[str, Family] = {}


def _add(model_types: tuple[str, ...], role: str, kinds: set[str], layouts: tuple[Layout, ...], hf_class: str) -> None:
    for mt in model_types:
        FAMILIES[mt] = Family(mt, role, frozenset(kinds), layouts, hf_class)


_add(("clip_vision_model",), "vision", {"vit"}, _VISION, "CLIPVisionModel")
_add(("clip",), "vision", {"vit"}, (lay(("vision_model.", "")),), "CLIPModel")
_add(("siglip_vision_model",), "vision", {"siglip"}, _VISION, "SiglipVisionModel")
_add(("siglip",), "vision", {"siglip"}, (lay(("vision_model.", "")),), "SiglipModel")
_add(("blip_2_vision_model", "instructblip_vision_model"), "vision", {"eva"}, _VISION, "Blip2VisionModel")
_add(("llama", "mistral", "qwen2"), "language", {"llama"}, _LM, "LlamaForCausalLM")
_add(("opt",), "language", {"opt"}, _LM, "OPTForCausalLM")
_add(("phi",), "language", {"phi"}, _LM, "PhiForCausalLM")
_add(("gemma",), "language", {"gemma"}, _LM, "GemmaForCausalLM")
_add(("blip_2_qformer",), "connector", {"qformer"}, (lay(("", "qformer.")),), "Blip2QFormerModel")


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a multi-part checkpoint: its role, its layouts, and where its family is read
    (`sub_config`: the config key whose `model_type` names a single-model family) or fixed `kinds`."""

    role: str
    layouts: tuple[Layout, ...]
    sub_config: str | None = None
    kinds: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class MultiFamily:
    name: str
    parts: dict[str, Part]
    default_part: dict[str, str] = field(default_factory=dict)  # role -> part


def multi_family(model_type: str) -> MultiFamily | None:
    """The multi-part family of a VLM `model_type` (formats/ declares them, one module each)."""
    from vlmspec.runtime.weights.formats import formats

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
        kinds, family = p.kinds, f"{mt}#{name}"
        if p.sub_config is not None:
            sub = str((config.get(p.sub_config) or {}).get("model_type", ""))
            if sub not in FAMILIES:
                raise weights_error(UNSUPPORTED, f"{folder}: part `{name}` is a `{sub}` model, which vlmspec "
                                    "cannot map", help="supported: " + ", ".join(sorted(FAMILIES)))
            kinds, family = FAMILIES[sub].kinds, f"{mt}#{name} ({sub})"
        if p.role != role or kind not in kinds:
            raise weights_error(WRONG_FAMILY, f"{role} `{component}` is a `{kind}` but {folder} part `{name}` is a "
                                f"{family} checkpoint", help=_fits(kinds))
        return Resolved(family, p.layouts)
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

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

"""Which Hugging Face checkpoints fit which spec components, and how their keys map.

Every family is an explicit table row: the `model_type` values of `config.json` it accepts, the spec
kinds it can fill, and its key layouts. A layout is a list of (checkpoint prefix, component prefix)
rules; a component key `k` under component prefix `p` is read from `checkpoint_prefix + k[len(p):]`.
A family may have several layouts (transformers has saved LLaVA as `language_model.model.*` and as
`model.language_model.*`); the first layout whose anchor (first rule) prefix occurs in the checkpoint
is used. Nothing is matched by substring or by folder name.

Multi-part checkpoints (one module each under `formats/`) have named parts: a spec selects one with
`weights = "DIR#part"`; without `#part` the part follows the component's role.

A family that stores several of our tensors as one (Phi-3's `qkv_proj` and `gate_up_proj`) declares how
to slice them (`Family.slices`); its layouts, and those of any multi-part checkpoint's part whose sub-config
is that family, become `Fused` layouts that read each of our tensors as rows of the fused one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
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
        arrangement rearranges it here; `shape` says what shape that gives)."""
        return tensor

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `convert` gives component key `key` from a checkpoint tensor of `shape`."""
        return shape

    def unconvert(self, key: str, tensor: Tensor) -> Tensor:
        """`convert`'s inverse: component key `key`'s tensor as the checkpoint stores it."""
        return tensor

    def export(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """A component's tensors under the checkpoint's keys (what `vlm export-hf` writes), and the
        component keys no rule covers (the exporter refuses a model with any)."""
        out: dict[str, Tensor] = {}
        unplaced = []
        for key, tensor in state.items():
            theirs = self.to_checkpoint(key)
            if theirs is None:
                unplaced.append(key)
            else:
                out[theirs] = self.unconvert(key, tensor)
        return out, unplaced


def lay(*rules: tuple[str, str]) -> Layout:
    return Layout(tuple(rules))


# config (the family's own, or a multi-part checkpoint's sub-config) -> {our key suffix: (the checkpoint's
# key suffix, first row, row after the last)}: the rows of a fused checkpoint tensor each of ours reads
Slices = Callable[[dict[str, Any]], dict[str, tuple[str, int, int]]]


@dataclass(frozen=True, slots=True)
class Fused(Layout):
    """`inner`, except that some of our tensors are row ranges of one checkpoint tensor (Phi-3's
    `self_attn.qkv_proj` holds q, k and v; `mlp.gate_up_proj` holds gate and up). The ranges come from the
    checkpoint's config (`bind`): its `sub_config` entry in a multi-part checkpoint, else the config itself.
    A checkpoint tensor whose rows do not add up keeps its own shape, so coverage reports the mismatch."""

    inner: Layout | None = None
    slices: Slices | None = None
    sub_config: str | None = None
    pieces: tuple[tuple[str, tuple[str, int, int]], ...] = ()

    def _piece(self, key: str) -> tuple[str, str, int, int] | None:
        """(our key with the checkpoint's suffix, that suffix, first row, row after the last) or None."""
        for ours, (theirs, start, stop) in self.pieces:
            if key.endswith("." + ours):
                return key[:-len(ours)] + theirs, theirs, start, stop
        return None

    def present(self, keys: Iterable[str]) -> bool:
        return self.inner.present(keys)  # type: ignore[union-attr]

    def to_checkpoint(self, key: str) -> str | None:
        piece = self._piece(key)
        return self.inner.to_checkpoint(piece[0] if piece else key)  # type: ignore[union-attr]

    def owns(self, ckpt_key: str) -> bool:
        return self.inner.owns(ckpt_key)  # type: ignore[union-attr]

    def bind(self, config: dict[str, Any]) -> Layout:
        own = (config.get(self.sub_config) or {}) if self.sub_config else config
        pieces = tuple(self.slices(own).items()) if self.slices is not None else ()
        return Fused(self.rules, self.inner.bind(config), self.slices, self.sub_config, pieces)  # type: ignore[union-attr]

    def _fits(self, key: str, rows: int) -> tuple[int, int] | None:
        piece = self._piece(key)
        if piece is None:
            return None
        whole = max(stop for theirs, _, stop in (v for _, v in self.pieces) if theirs == piece[1])
        return (piece[2], piece[3]) if whole == rows else None

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows = self._fits(key, shape[0]) if shape else None
        shape = (rows[1] - rows[0], *shape[1:]) if rows else shape
        return self.inner.shape(key, shape)  # type: ignore[union-attr]

    def convert(self, key: str, tensor: Tensor) -> Tensor:
        rows = self._fits(key, tensor.shape[0]) if tensor.dim() else None
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]].clone()  # a copy: the fused tensor is not kept alive
        return self.inner.convert(key, tensor)  # type: ignore[union-attr]

    def export(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """The inner layout's export, our row ranges concatenated back into the fused tensors (in row
        order, which `bind` took from the config the exporter writes)."""
        whole: dict[str, list[tuple[int, Tensor]]] = {}
        rest: dict[str, Tensor] = {}
        for key, tensor in state.items():
            piece = self._piece(key)
            if piece is None:
                rest[key] = tensor
            else:
                whole.setdefault(piece[0], []).append((piece[2], tensor))
        for fused_key, rows in whole.items():
            rest[fused_key] = torch.cat([t for _, t in sorted(rows, key=lambda r: r[0])], dim=0)
        return self.inner.export(rest)  # type: ignore[union-attr]


def fused(layouts: tuple[Layout, ...], slices: Slices, sub_config: str | None = None) -> tuple[Layout, ...]:
    return tuple(Fused(layout.rules, layout, slices, sub_config) for layout in layouts)


def phi3_slices(config: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """Phi-3: `qkv_proj` rows are q (heads x head_dim), k, v (kv_heads x head_dim each); `gate_up_proj`
    rows are gate, then up (`Phi3MLP`: `gate, up = gate_up_proj(x).chunk(2)`)."""
    heads = int(config.get("num_attention_heads", 32))
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or int(config.get("hidden_size", 3072)) // heads)
    q, k, f = heads * hd, kv * hd, int(config.get("intermediate_size", 8192))
    return {"self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0, q),
            "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", q, q + k),
            "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", q + k, q + 2 * k),
            "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0, f),
            "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", f, 2 * f)}


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
    slices: Slices | None = None  # which of our tensors are rows of one fused checkpoint tensor (Phi-3)

    def part_layouts(self, layouts: tuple[Layout, ...], sub_config: str) -> tuple[Layout, ...]:
        """The layouts of a multi-part checkpoint's part whose `sub_config` is this family's model."""
        return layouts if self.slices is None else fused(layouts, self.slices, sub_config)


FAMILIES: dict[str, Family] = {}


def _add(model_types: tuple[str, ...], role: str, kinds: set[str], layouts: tuple[Layout, ...], hf_class: str,
         slices: Slices | None = None) -> None:
    for mt in model_types:
        FAMILIES[mt] = Family(mt, role, frozenset(kinds), layouts if slices is None else fused(layouts, slices),
                              hf_class, slices)


_add(("clip_vision_model",), "vision", {"vit"}, _VISION, "CLIPVisionModel")
_add(("clip",), "vision", {"vit"}, (lay(("vision_model.", "")),), "CLIPModel")
_add(("siglip_vision_model",), "vision", {"siglip"}, _VISION, "SiglipVisionModel")
_add(("siglip",), "vision", {"siglip"}, (lay(("vision_model.", "")),), "SiglipModel")
_add(("blip_2_vision_model", "instructblip_vision_model"), "vision", {"eva"}, _VISION, "Blip2VisionModel")
_add(("llama", "mistral", "qwen2"), "language", {"llama"}, _LM, "LlamaForCausalLM")
_add(("opt",), "language", {"opt"}, _LM, "OPTForCausalLM")
_add(("phi",), "language", {"phi"}, _LM, "PhiForCausalLM")
_add(("phi3",), "language", {"llama"}, _LM, "Phi3ForCausalLM", phi3_slices)  # fused q/k/v and gate/up
_add(("gemma",), "language", {"gemma"}, _LM, "GemmaForCausalLM")
_add(("persimmon",), "language", {"persimmon"}, _LM, "PersimmonForCausalLM")  # Fuyu's decoder
# Mamba: `backbone.*` keys; the original state-spaces checkpoints spell the embedding `backbone.embedding`
_MAMBA = tuple(lay((emb, "backbone.embeddings."), ("backbone.", "backbone."), ("lm_head.", "lm_head."))
               for emb in ("backbone.embeddings.", "backbone.embedding."))
_add(("mamba",), "language", {"mamba"}, _MAMBA, "MambaForCausalLM")
# T5 / Flan-T5 (`T5ForConditionalGeneration`): `shared`, `encoder.*`, `decoder.*`, `lm_head` as the `t5` kind keeps them
_add(("t5",), "language", {"t5"}, (lay(("shared.", "shared."), ("encoder.", "encoder."), ("decoder.", "decoder."),
                                        ("lm_head.", "lm_head.")),), "T5ForConditionalGeneration")
_add(("blip_2_qformer",), "connector", {"qformer"}, (lay(("", "qformer.")),), "Blip2QFormerModel")
# DINOv2 and ConvNeXt keep transformers' module names, so their keys load as they are; a classifier's folder
# holds the tower under its base-model prefix (the head's keys are not the tower's and are ignored)
_add(("dinov2",), "vision", {"dinov2"}, (lay(("dinov2.", "")), lay(("", ""))), "Dinov2Model")
_add(("dinov2_with_registers",), "vision", {"dinov2"}, (lay(("dinov2_with_registers.", "")), lay(("", ""))),
     "Dinov2WithRegistersModel")
_add(("convnext",), "vision", {"convnext"}, (lay(("convnext.", "")), lay(("", ""))), "ConvNextModel")
# Pixtral's tower keeps transformers' module names (`patch_conv`, `ln_pre`, `transformer.layers.N...`)
_add(("pixtral",), "vision", {"pixtral"}, (lay(("vision_encoder.", "")), lay(("", ""))), "PixtralVisionModel")
# SAM's image encoder keeps transformers' module names (`patch_embed`, `pos_embed`, `layers.N...`, `neck`)
_add(("sam_vision_model", "sam"), "vision", {"sam"}, (lay(("vision_encoder.", "")),), "SamVisionModel")


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

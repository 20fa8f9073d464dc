"""Llama 3.2 Vision (`MllamaForConditionalGeneration`, model_type `mllama`): a tiled ViT (local layers,
then gated global ones), a linear projector of the last hidden state and five intermediate ones, and a
Llama text model with tanh-gated cross-attention layers between its self-attention layers.

What the spec says, and why:
- `vit` with `tiles`, `global_layers`, `tile_padding = 8`, `attn_bias = false`; `feature` lists the last
  layer first, then Mllama's `intermediate_layers_indices` + 1 (its indices count layer outputs from 0,
  ours hidden states from the embeddings). Mllama stacks the intermediate states channel by channel
  (`torch.stack(..., dim=-1)`), we concatenate them: the projector's input columns are rearranged at load
  time (`ProjectorLayout`), so the same features reach the same weights.
- Mllama numbers its cross-attention layers among all decoder layers (3, 8, 13, ... of 40); our blocks
  sit before self-attention layers (3, 7, 11, ... of 32): `TextLayout` and `CrossLayout` translate.
- The text embedding has 8 rows more than the head (`embed_extra = 8`; `<|image|>` is the first of them).
- `image_attention = latest_group`: a text token attends to the images of the latest run of adjacent
  `<|image|>` tokens at or before it (the processor's `cross_attention_mask`), only to their real tiles.
  `no_image = attend_all` is what transformers does with a token before the first image (it attends
  to every visual token, unmasked, and its feed-forward is zeroed); Meta's reference zeroes both
  branches (`skip_block`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmspec.runtime.weights.families import Layout, MultiFamily, Part
from vlmspec.runtime.weights.formats.base import VLMFormat
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need, rope_fields

#: checkpoint prefixes: transformers' save layout (still written by 5.x), then its in-memory one
_SAVED = {"vision": "vision_model.", "projector": "multi_modal_projector.", "text": "language_model.model.",
          "head": "language_model.lm_head."}
_LOADED = {"vision": "model.vision_model.", "projector": "model.multi_modal_projector.",
           "text": "model.language_model.", "head": "lm_head."}
_PREFIXES = (_SAVED, _LOADED)


def _cross_layers(config: dict[str, Any]) -> list[int]:
    return sorted(int(i) for i in (config.get("text_config") or {}).get("cross_attention_layers") or [])


def _self_layers(config: dict[str, Any]) -> list[int]:
    """Mllama's indices of its self-attention layers, in order (ours are 0, 1, 2, ...)."""
    tc = config.get("text_config") or {}
    cross = set(_cross_layers(config))
    return [i for i in range(int(tc.get("num_hidden_layers", 40))) if i not in cross]


def _block_positions(config: dict[str, Any]) -> dict[int, int]:
    """Our decoder-layer index a cross-attention block sits before -> Mllama's index of that layer."""
    cross = _cross_layers(config)
    return {c - k: c for k, c in enumerate(cross)}


@dataclass(frozen=True, slots=True)
class _Bound(Layout):
    """A layout whose mapping needs the checkpoint's config: `bind` returns a copy holding it."""

    prefixes: tuple[tuple[str, str], ...] = ()
    config: tuple[tuple[str, Any], ...] = ()

    def _p(self, name: str) -> str:
        return dict(self.prefixes)[name]

    def _cfg(self) -> dict[str, Any]:
        return dict(self.config)

    def bind(self, config: dict[str, Any]) -> Layout:
        return type(self)(self.rules, self.prefixes, tuple(config.items()))


def _layer_split(key: str, prefix: str) -> tuple[int, str] | None:
    m = re.match(re.escape(prefix) + r"(\d+)\.(.*)", key)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True, slots=True)
class VisionLayout(_Bound):
    """Our `vit` keys <-> Mllama's vision model (renamed embeddings, `transformer` + `global_transformer`)."""

    _FIXED = {
        "embeddings.patch_embedding.weight": "patch_embedding.weight",
        "embeddings.class_embedding": "class_embedding",
        "embeddings.position_embedding.weight": "gated_positional_embedding.embedding",
        "embeddings.tile_embedding.weight": "gated_positional_embedding.tile_embedding.weight",
        "embeddings.position_gate": "gated_positional_embedding.gate",
        "embeddings.pre_tile_positional_embedding.embedding.weight": "pre_tile_positional_embedding.embedding.weight",
        "embeddings.pre_tile_positional_embedding.gate": "pre_tile_positional_embedding.gate",
        "embeddings.post_tile_positional_embedding.embedding.weight": "post_tile_positional_embedding.embedding.weight",
        "embeddings.post_tile_positional_embedding.gate": "post_tile_positional_embedding.gate",
        "pre_layrnorm.weight": "layernorm_pre.weight", "pre_layrnorm.bias": "layernorm_pre.bias",
        "post_layernorm.weight": "layernorm_post.weight", "post_layernorm.bias": "layernorm_post.bias",
    }
    _INNER = (("self_attn.out_proj.", "self_attn.o_proj."), ("layer_norm1.", "input_layernorm."),
              ("layer_norm2.", "post_attention_layernorm."))

    def to_checkpoint(self, key: str) -> str | None:
        p = self._p("vision")
        if key in self._FIXED:
            return p + self._FIXED[key]
        split = _layer_split(key, "encoder.layers.")
        if split is None:
            return None
        i, rest = split
        for ours, theirs in self._INNER:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
        local = int((self._cfg().get("vision_config") or {}).get("num_hidden_layers", 32))
        return f"{p}transformer.layers.{i}.{rest}" if i < local else f"{p}global_transformer.layers.{i - local}.{rest}"

    def owns(self, ckpt_key: str) -> bool:
        return ckpt_key.startswith(self._p("vision"))


@dataclass(frozen=True, slots=True)
class ProjectorLayout(_Bound):
    """The linear connector <-> `multi_modal_projector`, input columns rearranged: Mllama's features are
    [last (w), intermediate states interleaved channel by channel (w x k)], ours [last, each state in turn]."""

    def to_checkpoint(self, key: str) -> str | None:
        return self._p("projector") + key[len("linear."):] if key.startswith("linear.") else None

    def owns(self, ckpt_key: str) -> bool:
        return ckpt_key.startswith(self._p("projector"))

    def convert(self, key: str, tensor: Tensor) -> Tensor:
        if key != "linear.weight":
            return tensor
        vc = self._cfg().get("vision_config") or {}
        w, k = int(vc.get("hidden_size", 1280)), len(vc.get("intermediate_layers_indices") or [])
        if k < 2 or tensor.shape[1] != w * (k + 1):
            return tensor
        last, inter = tensor[:, :w], tensor[:, w:]
        # theirs: column w + c * k + j holds channel c of state j; ours: column w + j * w + c
        ours = inter.reshape(-1, w, k).transpose(1, 2).reshape(-1, w * k)
        return torch.cat([last, ours], dim=1)


@dataclass(frozen=True, slots=True)
class TextLayout(_Bound):
    """Our Llama (`model.layers.i`: self-attention layers only) <-> Mllama's text model, whose layer list
    interleaves the cross-attention layers."""

    def to_checkpoint(self, key: str) -> str | None:
        p = self._p("text")
        if key.startswith("lm_head."):
            return self._p("head") + key[len("lm_head."):]
        if key.startswith(("model.embed_tokens.", "model.norm.")):
            return p + key[len("model."):]
        split = _layer_split(key, "model.layers.")
        if split is None:
            return None
        i, rest = split
        selfs = _self_layers(self._cfg())
        return f"{p}layers.{selfs[i]}.{rest}" if i < len(selfs) else None

    def owns(self, ckpt_key: str) -> bool:
        if ckpt_key.startswith(self._p("head")):
            return True
        p = self._p("text")
        split = _layer_split(ckpt_key, p + "layers.")
        if split is not None:
            return split[0] not in set(_cross_layers(self._cfg()))
        return ckpt_key.startswith(p)

    def present(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(self._p("text")) for k in keys)


@dataclass(frozen=True, slots=True)
class CrossLayout(_Bound):
    """Our cross-attention fusion (`layers.i`: the block before self-attention layer i) <-> Mllama's
    cross-attention decoder layers (same names inside a block)."""

    def to_checkpoint(self, key: str) -> str | None:
        split = _layer_split(key, "layers.")
        if split is None:
            return None
        i, rest = split
        theirs = _block_positions(self._cfg()).get(i)
        return f"{self._p('text')}layers.{theirs}.{rest}" if theirs is not None else None

    def owns(self, ckpt_key: str) -> bool:
        split = _layer_split(ckpt_key, self._p("text") + "layers.")
        return split is not None and split[0] in set(_cross_layers(self._cfg()))

    def present(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(self._p("text")) for k in keys)


def _layouts(cls: type[_Bound]) -> tuple[Layout, ...]:
    return tuple(cls(((p["vision"] if cls is VisionLayout else p["text"], ""),), tuple(p.items()))
                 for p in _PREFIXES)


def _preprocessing(folder: str, size: int, tiles: int) -> list[tuple[str, Any]]:
    """The processor's mean / std / resize filter (`preprocessor_config.json`, or transformers 5's
    `processor_config.json`), checked against the model: the tile size and count, a rescale of 1/255,
    normalisation, resizing and padding on (what vlmspec's tiling does)."""
    pre = image_processor(folder)
    if not pre:
        return [("resize", "bilinear")]  # MllamaImageProcessor's filter
    tile = pre.get("size") or {}
    side = tile.get("height", size) if isinstance(tile, dict) else tile
    need(side == size and (not isinstance(tile, dict) or tile.get("width", side) == side),
         f"a processor tile size {side} other than the vision model's {size}")
    need(int(pre.get("max_image_tiles", tiles)) == tiles, f"a processor max_image_tiles {pre.get('max_image_tiles')} "
         f"other than the vision model's {tiles}")
    need(pre.get("do_resize", True) and pre.get("do_pad", True), "a Mllama processor that does not resize or pad "
         "(vlmspec always fits an image to its tiles)")
    factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 0.0
    need(abs(factor * 255 - 1) < 1e-6, f"processor rescale {factor} (vlmspec scales by 1/255)")
    need(pre.get("do_normalize", True), "a processor that does not normalise (`do_normalize = false`)")
    resample = pre.get("resample", 2)
    need(resample in RESAMPLE, f"processor resample filter {resample}")
    out: list[tuple[str, Any]] = [("resize", RESAMPLE[resample])]
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if isinstance(mean, list) and isinstance(std, list):
        out += [("mean", Raw(str([float(m) for m in mean]))), ("std", Raw(str([float(x) for x in std])))]
    return out


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int | None]:
    vc, tc = config.get("vision_config") or {}, config.get("text_config") or {}
    size, patch = int(vc.get("image_size", 560)), int(vc.get("patch_size", 14))
    need(size % patch == 0, f"image_size {size} not a multiple of patch_size {patch}")
    tiles = int(vc.get("max_num_tiles", 4))
    ours = [w * h for w in range(1, tiles + 1) for h in range(1, tiles + 1) if w * h <= tiles]
    ratios = vc.get("supported_aspect_ratios")
    need(ratios is None or [int(w) * int(h) for w, h in ratios] == ours,
         f"supported_aspect_ratios {ratios} other than Mllama's own for {tiles} tiles")
    act = vc.get("hidden_act", "gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    local, n_global = int(vc.get("num_hidden_layers", 32)), int(vc.get("num_global_layers", 8))
    need(n_global >= 1, "a vision model without global layers")
    depth = local + n_global
    inter = [int(i) for i in vc.get("intermediate_layers_indices") or []]
    need(all(0 <= i < local for i in inter), f"intermediate_layers_indices {inter} outside the {local} local layers")
    width = int(vc.get("hidden_size", 1280))
    need(int(vc.get("vision_output_dim", width * (len(inter) + 1))) == width * (len(inter) + 1),
         f"vision_output_dim {vc.get('vision_output_dim')} (Mllama's is hidden_size x (intermediate layers + 1))")
    feature = "layers([" + ", ".join(str(i) for i in [depth, *(i + 1 for i in inter)]) + "]).all"
    vision = fields([
        ("image_size", size), ("patch_size", patch), ("channels", int(vc.get("num_channels", 3))),
        ("tiles", tiles), ("global_layers", n_global), ("tile_padding", 8), ("attn_bias", False),
        ("width", width), ("depth", depth), ("heads", int(vc.get("attention_heads", 16))),
        ("mlp", int(vc.get("intermediate_size", 5120))), ("act", VISION_ACT[act]),
        ("norm_eps", float(vc.get("norm_eps", 1e-5))), ("feature", feature), *_preprocessing(folder, size, tiles),
        ("weights", f"{folder}#vision")])
    blocks = [f"  vision vit = vit {{\n{vision}\n  }}"]

    text_width = int(tc.get("hidden_size", 4096))
    blocks.append(f"  connector proj = linear(vit -> llm) {{\n{fields([('out', text_width), ('weights', f'{folder}#projector')])}\n  }}")

    need(tc.get("hidden_act", "silu") == "silu", f"text activation {tc.get('hidden_act')}")
    need(not tc.get("tie_word_embeddings", False), "tied text embeddings (Mllama's embedding has 8 rows more "
         "than its head)")
    cross = _cross_layers(config)
    selfs = _self_layers(config)
    positions = sorted(_block_positions(config))
    need(bool(cross), "a text model without cross-attention layers")
    need(len(positions) == len(cross), f"adjacent cross-attention layers {cross} (a block sits before a "
         "self-attention layer, one per layer)")
    need(positions[-1] < len(selfs), f"a cross-attention layer after the last self-attention layer ({cross})")
    heads = int(tc.get("num_attention_heads", 32))
    need(text_width % heads == 0, f"text width {text_width} not divisible by {heads} heads")
    language = fields([
        ("width", text_width), ("depth", len(selfs)), ("heads", heads),
        ("kv_heads", int(tc.get("num_key_value_heads") or heads)), ("ffn", int(tc.get("intermediate_size", 14336))),
        ("vocab", int(tc.get("vocab_size", 128256))), ("embed_extra", 8),
        ("max_positions", int(tc.get("max_position_embeddings", 131072))),
        ("norm_eps", float(tc.get("rms_norm_eps", 1e-5))), *rope_fields(tc),
        ("tie_embeddings", False), ("weights", f"{folder}#language")])
    blocks.append(f"  language llm = llama {{\n{language}\n  }}")

    image_token = int(config.get("image_token_index", int(tc.get("vocab_size", 128256))))
    need(0 <= image_token < int(tc.get("vocab_size", 128256)) + 8,
         f"image_token_index {image_token} outside the embedding's rows")
    fusion = fields([
        ("layers", positions), ("gate", "tanh"), ("mlp", True), ("qk_norm", True),
        ("image_token", "<|image|>"), ("image_attention", "latest_group"), ("no_image", "attend_all"),
        ("weights", f"{folder}#cross_attention")])
    blocks.append(f"  fusion cross_attention(proj -> llm) {{\n{fusion}\n  }}")
    return blocks, image_token


FORMAT = VLMFormat(
    model_types=("mllama",),
    family=MultiFamily("mllama", {
        "vision": Part("vision", _layouts(VisionLayout), kinds=frozenset({"vit"})),
        "projector": Part("connector", tuple(ProjectorLayout(((p["projector"], "linear."),), tuple(p.items()))
                                             for p in _PREFIXES), kinds=frozenset({"linear"})),
        "language": Part("language", _layouts(TextLayout), kinds=frozenset({"llama"})),
        "cross_attention": Part("fusion", _layouts(CrossLayout), kinds=frozenset({"cross_attention"})),
    }, {"vision": "vision", "connector": "projector", "language": "language", "fusion": "cross_attention"}),
    components={"vit": "vision", "proj": "projector", "llm": "language", "cross_attention": "cross_attention"},
    read=read,
)

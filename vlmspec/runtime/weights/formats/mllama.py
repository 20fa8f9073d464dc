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

Export (`write`) is the inverse: the keys transformers 5 saves (`vision_model.`, `multi_modal_projector.`,
`language_model.model.` / `language_model.lm_head.`; the projector's columns put back in Mllama's order),
an MllamaConfig whose `cross_attention_layers` place the fusion's blocks, MllamaImageProcessor's tiling
with the spec's tile count, filter, mean and std, and MllamaProcessor. What Mllama cannot hold is refused
(E0586).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmspec.compiler.schema.language import Llama3RoPE
from vlmspec.runtime.weights.families import Layout, MultiFamily, Part
from vlmspec.runtime.weights.formats.base import (
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need, rope_fields

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

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
        w, k = self._widths()
        if k < 2 or tensor.shape[1] != w * (k + 1):
            return tensor
        last, inter = tensor[:, :w], tensor[:, w:]
        # theirs: column w + c * k + j holds channel c of state j; ours: column w + j * w + c
        ours = inter.reshape(-1, w, k).transpose(1, 2).reshape(-1, w * k)
        return torch.cat([last, ours], dim=1)

    def unconvert(self, key: str, tensor: Tensor) -> Tensor:
        """`convert`'s inverse: our columns [last, state 0, state 1, ...] back in Mllama's interleaved order."""
        w, k = self._widths()
        if key != "linear.weight" or k < 2 or tensor.shape[1] != w * (k + 1):
            return tensor
        last, inter = tensor[:, :w], tensor[:, w:]
        theirs = inter.reshape(-1, k, w).transpose(1, 2).reshape(-1, w * k)
        return torch.cat([last, theirs], dim=1)

    def _widths(self) -> tuple[int, int]:
        """(the vision width, the number of intermediate states) of the bound config."""
        vc = self._cfg().get("vision_config") or {}
        return int(vc.get("hidden_size", 1280)), len(vc.get("intermediate_layers_indices") or [])


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
    eps = float(vc.get("norm_eps", 1e-5))
    need(eps == _OUTER_EPS, f"vision norm_eps = {eps} (Mllama's pre- and post-LayerNorms keep {_OUTER_EPS} "
         "whatever it says; a `vit` has one epsilon)")
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


# ------------------------------------------------------------------ export

_NAME = "Mllama"
_HINT = ("Mllama is one tiled `vit` (global layers, tile_padding = 8, no attention biases) read at its last layer "
         "and some local ones, a biased `linear` projector, a `llama` with 8 extra embedding rows and tanh-gated "
         "`cross_attention` blocks (qk_norm, latest_group, attend_all), unquantized")
_RESAMPLE_CODE = {name: code for code, name in RESAMPLE.items()}  # PIL's codes, as the image processor stores them
#: the pre- and post-LayerNorms of Mllama's vision model keep PyTorch's default eps whatever `norm_eps` says
_OUTER_EPS = 1e-5
#: the placeholder MllamaProcessor finds images by (the tokenizer's `image_token`, else this)
IMAGE_TOKEN = "<|image|>"

# attributes each config below carries (or `write` checks against it); every other attribute must keep its
# kind's default, or the value `fixed` names (see `unplaced_attribute`)
_VIT = {"image_size", "patch_size", "channels", "tiles", "global_layers", "width", "depth", "heads", "mlp", "act",
        "norm_eps", "feature", "mean", "std", "resize", "weights", "dtype"}
_VIT_FIXED = {"tile_padding": 8, "attn_bias": False}
# one source, so `merge` merges nothing
_LINEAR = {"merge", "out", "bias", "weights", "dtype"}
_LLAMA = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "embed_extra", "max_positions",
          "norm_eps", "rope_theta", "rope", "tie_embeddings", "weights", "tokenizer", "dtype"}
_CROSS = {"every", "offset", "layers", "weights"}
_CROSS_FIXED = {"gate": "tanh", "mlp": True, "qk_norm": True, "image_token": IMAGE_TOKEN,
                "image_attention": "latest_group", "no_image": "attend_all", "vector_gates": False}


def claims(ir: ModelIR) -> bool:
    """Cross-attention fed by one linear projector: Mllama's shape (IDEFICS' is fed by the encoder or a
    perceiver; what does not fit Mllama is then said by `write`)."""
    return [f.kind for f in ir.by_role("fusion")] == ["cross_attention"] and \
        [c.kind for c in ir.by_role("connector")] == ["linear"]


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, _HINT)



def _parts(ir: ModelIR) -> tuple[Component, Component, Component, Component]:
    """(vision, projector, language, fusion), wired as Mllama wires them, unquantized, in one dtype."""
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(v) == 1 for v in by.values()) and len(ir.components) == 4,
         "a model with other than one encoder, connector, language model and fusion")
    vis, con, lm, fus = (by[r][0] for r in ("vision", "connector", "language", "fusion"))
    _fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {', '.join(con.sources)}")
    _fit(list(fus.sources) == [con.name], f"fusion `{fus.name}` reading {', '.join(fus.sources)} (Mllama's "
         f"cross-attention reads the projector `{con.name}`)")
    for comp in (vis, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"{comp.role} `{comp.name}` with quantize = {q} (transformers would serve the "
             "unquantized weights)")
    dtypes = {getattr(c.config, "dtype", None) for c in (vis, con, lm)} - {None}
    _fit(len(dtypes) <= 1, f"components in dtypes {', '.join(sorted(dtypes))} (a checkpoint has one)")
    return vis, con, lm, fus


def _hidden_state(layer: int, depth: int) -> int:
    """A `feature` layer as a hidden-state index from 0 (the embeddings) to `depth`."""
    return layer if layer >= 0 else depth + 1 + layer


def _intermediate(vis: Component) -> list[int]:
    """`intermediate_layers_indices`: `feature` is the last layer, then local hidden states 1..local, each
    Mllama's output of local layer i - 1; all tokens (the class token included)."""
    v = vis.config
    local = v.depth - v.global_layers
    states = [_hidden_state(i, v.depth) for i in v.feature.layers]
    what = f"vision `{vis.name}` with feature = {v.feature.to_vlm()} (Mllama reads the last layer's tokens, then " \
           f"those of some of its {local} local layers: `layers([{v.depth}, i, ...]).all`, 1 <= i <= {local})"
    _fit(v.feature.tokens == "all" and len(states) >= 2 and states[0] == v.depth
         and all(1 <= i <= local for i in states[1:]), what)
    return [i - 1 for i in states[1:]]


def _aspect_ratios(tiles: int) -> list[list[int]]:
    """Mllama's tile layouts (w, h) with w * h <= tiles, in its aspect-ratio id order (vlmspec's too)."""
    return [[w, h] for w in range(1, tiles + 1) for h in range(1, tiles + 1) if w * h <= tiles]


def _vision(vis: Component) -> dict[str, Any]:
    """`vision_config`: the tiled tower, its local and global layers and the states the projector reads."""
    v = vis.config
    _fit(vis.kind == "vit" and v.tiles >= 1 and v.global_layers >= 1,
         f"vision `{vis.name}` ({vis.kind}, tiles = {v.tiles}, global_layers = {v.global_layers}; Mllama's tower "
         "tiles its images and ends in gated global layers)")
    _fit(v.global_layers < v.depth, f"vision `{vis.name}` with global_layers = {v.global_layers} of depth "
         f"{v.depth} (Mllama has local layers before them)")
    _fit(v.act in ACT_HF, f"vision `{vis.name}` with act = {v.act}")
    _fit(v.norm_eps == _OUTER_EPS, f"vision `{vis.name}` with norm_eps = {v.norm_eps} (Mllama's pre- and "
         f"post-LayerNorms keep {_OUTER_EPS} whatever `norm_eps` says)")
    inter = _intermediate(vis)
    refuse_unplaced(vis, _fit, _VIT, _VIT_FIXED)
    return {"model_type": "mllama_vision_model", "hidden_size": v.width, "hidden_act": ACT_HF[v.act],
            "num_hidden_layers": v.depth - v.global_layers, "num_global_layers": v.global_layers,
            "attention_heads": v.heads, "num_channels": v.channels, "intermediate_size": v.mlp_dim,
            "vision_output_dim": v.width * (len(inter) + 1), "image_size": v.image_size,
            "patch_size": v.patch_size, "norm_eps": v.norm_eps, "max_num_tiles": v.tiles,
            "intermediate_layers_indices": inter, "supported_aspect_ratios": _aspect_ratios(v.tiles)}


def _projector(con: Component, text_width: int) -> None:
    """`multi_modal_projector`: one biased linear map from the concatenated states to the text width."""
    c = con.config
    _fit(c.bias, f"connector `{con.name}` with bias = false (Mllama's projector has a bias)")
    _fit(c.out in (None, text_width), f"connector `{con.name}` with out = {c.out} (the text width is {text_width})")
    refuse_unplaced(con, _fit, _LINEAR)


def _rope(lm: Component) -> dict[str, Any]:
    """`rope_parameters`: default, or Llama 3.1's scaling (the released checkpoints')."""
    t = lm.config
    if t.rope == "default":
        return {"rope_type": "default", "rope_theta": t.rope_theta}
    r = t.rope
    _fit(isinstance(r, Llama3RoPE), f"language model `{lm.name}` with rope = {r.to_vlm()}")
    return {"rope_type": "llama3", "rope_theta": t.rope_theta, "factor": r.factor,
            "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_positions}


def _text(lm: Component, fus: Component, session: Session) -> dict[str, Any]:
    """`text_config`: Llama (SiLU, heads that split the width) with the 8 extra embedding rows, untied, its
    layer list the self-attention layers with the cross-attention ones interleaved."""
    t = lm.config
    _fit(lm.kind == "llama", f"language model `{lm.name}` ({lm.kind})")
    _fit(t.hd * t.heads == t.width, f"language model `{lm.name}` with head_dim = {t.hd} (Mllama's heads split "
         f"its width {t.width})")
    _fit(t.embed_extra == 8 and not t.tie_embeddings, f"language model `{lm.name}` with embed_extra = "
         f"{t.embed_extra}, tie_embeddings = {str(t.tie_embeddings).lower()} (Mllama's embedding has 8 rows "
         "more than its untied head)")
    refuse_unplaced(lm, _fit, _LLAMA)
    cross = _cross_layers_of(fus, t.depth)
    ids = special_token_ids(session)
    pad = ids.pop("pad_token_id", None)
    ids["pad_token_id"] = pad if pad is not None and pad < t.vocab + 8 else None  # the embedding's padding row
    return {"model_type": "mllama_text_model", "vocab_size": t.vocab, "hidden_size": t.width, "hidden_act": "silu",
            "num_hidden_layers": t.depth + len(cross), "num_attention_heads": t.heads,
            "num_key_value_heads": t.n_kv, "intermediate_size": t.ffn, "rope_parameters": _rope(lm),
            "rms_norm_eps": t.norm_eps, "max_position_embeddings": t.max_positions, "tie_word_embeddings": False,
            "cross_attention_layers": cross, "dropout": 0.0, "use_cache": True, **ids}


def _cross_layers_of(fus: Component, depth: int) -> list[int]:
    """`cross_attention_layers`: the k-th block (before our self-attention layer p) is Mllama's layer p + k,
    as the k blocks before it sit among its layers too."""
    _fit(fus.kind == "cross_attention", f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, _fit, _CROSS, _CROSS_FIXED)
    return [p + k for k, p in enumerate(fus.config.layer_ids(depth))]


def _image_token(session: Session, vocab: int) -> int:
    """`image_token_index`: the model's placeholder id, one of the embedding's rows, and the tokenizer's
    `<|image|>` (MllamaProcessor finds images by it and starts prompts with BOS)."""
    image = int(session.model.image_token_id)
    _fit(0 <= image < vocab + 8, f"image token id {image} outside the embedding's {vocab + 8} rows")
    tok = session.tokenizer
    if tok is not None:
        _fit(bool(tok.bos_token), "a tokenizer without a BOS token (MllamaProcessor starts every prompt with it)")
        named = getattr(tok, "image_token", None) or IMAGE_TOKEN
        found = tok.convert_tokens_to_ids(named)
        _fit(found == image, f"image token id {image} (the tokenizer's `{named}`, which MllamaProcessor uses, is "
             f"{found})")
    return image


def mllama_config(session: Session) -> dict[str, Any]:
    """The `MllamaConfig` fields of a spec-built model (E0586 for what it cannot hold)."""
    vis, con, lm, fus = _parts(session.analysis.ir)
    vision = _vision(vis)
    _projector(con, lm.config.width)
    text = _text(lm, fus, session)
    return {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"],
            "image_token_index": _image_token(session, lm.config.vocab), "vision_config": vision,
            "text_config": text}


def processor_files(vis: Component) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json`: MllamaImageProcessor's tiling (the aspect ratio of at most `tiles` tiles
    that fits the image best, resize within it keeping the aspect, pad, split) at the tower's tile size,
    with its filter, 1/255, mean and std (what vlmspec's tiling does); `processor_config.json`."""
    v = vis.config
    s = v.image_size
    image = {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
             "do_convert_rgb": True, "do_resize": True, "size": {"height": s, "width": s},
             "resample": _RESAMPLE_CODE[v.resize], "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std), "do_pad": True,
             "max_image_tiles": v.tiles}
    return {"preprocessor_config.json": image, "processor_config.json": {"processor_class": "MllamaProcessor"}}


def _saved(cls: type[_Bound], part: str, ours: str = "") -> Layout:
    """A layout in transformers' save layout, unbound (the exporter binds it to the config it writes)."""
    return cls(((_SAVED[part], ours),), tuple(_SAVED.items()))


def write(session: Session) -> Export:
    """The Mllama checkpoint of an Mllama-shaped model, in the layout transformers saves (`vision_model.`,
    `multi_modal_projector.`, `language_model.model.` with the cross-attention layers interleaved,
    `language_model.lm_head.`)."""
    config = mllama_config(session)
    vis, con, lm, fus = _parts(session.analysis.ir)
    layouts = {vis.name: _saved(VisionLayout, "vision"), con.name: _saved(ProjectorLayout, "projector", "linear."),
               lm.name: _saved(TextLayout, "text"), fus.name: _saved(CrossLayout, "text")}
    if session.tokenizer is None:  # no processor without a tokenizer: the exporter writes weights and config
        return Export(config, layouts)
    return Export(config, layouts, processor_files(vis))


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
    claims=claims,
    write=write,
    hf_class="MllamaForConditionalGeneration",
    processor="`MllamaProcessor`: `MllamaImageProcessor` (up to `max_image_tiles` tiles of the tile size)",
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

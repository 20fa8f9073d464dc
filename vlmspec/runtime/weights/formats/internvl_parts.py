"""Building blocks for an InternVL (`InternVLForConditionalGeneration`, model_type `internvl`) format:
the vision tower's and the projector's key layouts, and the `internvit` block a `vision_config` gives.

Not registered as a format: the whole model (tiling, the text model, the chat template) is assembled
elsewhere from these pieces.

Vision keys (`InternVLVisionModel`) against ours (`vlmspec.runtime.vision.encoder`):

    embeddings.cls_token                      embeddings.class_embedding        [1 x 1 x w]
    embeddings.position_embeddings            embeddings.position_embedding     [1 x (1 + patches) x w]
    embeddings.patch_embeddings.projection.*  embeddings.patch_embedding.*
    encoder.layer.N.attention.{q,k,v}_proj.*  encoder.layers.N.self_attn.{q,k,v}_proj.*
    encoder.layer.N.attention.{q,k}_norm.*    encoder.layers.N.self_attn.{q,k}_norm.*   (qk_norm)
    encoder.layer.N.attention.projection_layer.*  encoder.layers.N.self_attn.out_proj.*
    encoder.layer.N.layernorm_before.*        encoder.layers.N.layer_norm1.*
    encoder.layer.N.layernorm_after.*         encoder.layers.N.layer_norm2.*
    encoder.layer.N.mlp.fc{1,2}.*             encoder.layers.N.mlp.fc{1,2}.*
    encoder.layer.N.lambda_1 / lambda_2       encoder.layers.N.scale_attn / scale_ffn
    layernorm.*                               post_layernorm.*                  (use_mean_pooling = false)

Projector keys (`InternVLMultiModalProjector`) against a `pixel_shuffle` connector's: `layer_norm.*` ->
`norm.*`, `linear_1.*` and `linear_2.*` alike. InternVL's pixel shuffle puts each 2 x 2 block's tokens
row by row into the channels, the order `pixel_shuffle` uses (tests/runtime/test_pixel_shuffle_variants.py
checks it against transformers' function), so the connector needs no option for it.
"""

from __future__ import annotations

from typing import Any

from vlmspec.runtime.weights.families import Layout, lay
from vlmspec.runtime.weights.formats.qwen2_vl import RenamedLayout
from vlmspec.runtime.weights.spec_text import VISION_ACT, fields, need

#: where transformers has saved InternVL's parts: `model.vision_tower.*` (transformers 5) and the older
#: top-level `vision_tower.*`; the first whose anchor a checkpoint holds is used
PREFIXES = ("model.", "")

#: (ours, theirs) renames inside one block, applied after the prefix rules (`.self_attn.` last: it is a
#: prefix of `.self_attn.out_proj.`)
VISION_RENAMES = ((".self_attn.out_proj.", ".attention.projection_layer."), (".self_attn.", ".attention."),
                  (".layer_norm1.", ".layernorm_before."), (".layer_norm2.", ".layernorm_after."),
                  (".scale_attn", ".lambda_1"), (".scale_ffn", ".lambda_2"))


def vision_layout(prefix: str = "model.") -> RenamedLayout:
    """The vision tower under `{prefix}vision_tower.` (anchor: its blocks)."""
    p = f"{prefix}vision_tower."
    return RenamedLayout(((f"{p}encoder.layer.", "encoder.layers."),
                          (f"{p}embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
                          (f"{p}embeddings.cls_token", "embeddings.class_embedding"),
                          (f"{p}embeddings.position_embeddings", "embeddings.position_embedding"),
                          (f"{p}layernorm.", "post_layernorm.")), VISION_RENAMES)


def projector_layout(prefix: str = "model.") -> Layout:
    """The projector under `{prefix}multi_modal_projector.`, onto a `pixel_shuffle` connector."""
    p = f"{prefix}multi_modal_projector."
    return lay((f"{p}layer_norm.", "norm."), (p, ""))


VISION_LAYOUTS = tuple(vision_layout(p) for p in PREFIXES)
PROJECTOR_LAYOUTS = tuple(projector_layout(p) for p in PREFIXES)

NORM = {"layer_norm": "layer", "rms_norm": "rms"}


def _side(value: Any, what: str) -> int:
    """A size transformers may store as one int or as [height, width]; the spec's are square."""
    if isinstance(value, list | tuple):
        need(len(value) == 2 and value[0] == value[1], f"a non-square vision {what} {list(value)}")
        return int(value[0])
    return int(value)


def feature(layer: Any = -1, strategy: str = "default") -> str:
    """`feature = ...` for InternVL's `vision_feature_layer` / `vision_feature_select_strategy`.

    InternVL reads layer -1 as the tower's last hidden state (post-LayerNorm included when there is one)
    and any other index from the un-normalised hidden states, as `layer(N)` with `feature_norm` does;
    the last layer named by its positive index would be read un-normalised, which a spec cannot say."""
    need(isinstance(layer, int), f"vision_feature_layer {layer!r} (one layer index)")
    need(strategy in ("default", "full"), f"vision_feature_select_strategy {strategy!r}")
    return f"layer({layer}).{'patches' if strategy == 'default' else 'all'}"


def vision_fields(vc: dict[str, Any], *, layer: Any = -1, strategy: str = "default",
                  weights: str | None = None) -> list[tuple[str, Any]]:
    """The `internvit` block's fields for an `InternVLVisionConfig` dict (its defaults where a key is
    missing). Dropout rates are training settings and are not carried; a mask token (masked image
    modelling) and the absence of learned positions are refused."""
    need(not vc.get("use_mask_token", False), "InternViT `use_mask_token` (a masked-image-modelling token)")
    need(vc.get("use_absolute_position_embeddings", True), "InternViT without learned absolute positions")
    act = vc.get("hidden_act", "gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    norm = vc.get("norm_type", "layer_norm")
    need(norm in NORM, f"InternViT norm_type {norm!r}")
    depth = int(vc.get("num_hidden_layers", 24))
    post_norm = not vc.get("use_mean_pooling", True)
    need(not (post_norm and layer == depth), f"vision_feature_layer {layer}: InternVL reads the last layer "
         "un-normalised by its positive index; write it as -1")
    out: list[tuple[str, Any]] = [
        ("image_size", _side(vc.get("image_size", 448), "image_size")),
        ("patch_size", _side(vc.get("patch_size", 14), "patch_size")),
        ("channels", int(vc.get("num_channels", 3))),
        ("width", int(vc.get("hidden_size", 1024))), ("depth", depth),
        ("heads", int(vc.get("num_attention_heads", 16))), ("mlp", int(vc.get("intermediate_size", 4096))),
        ("act", VISION_ACT[act]), ("norm", NORM[norm]), ("norm_eps", float(vc.get("layer_norm_eps", 1e-6))),
        ("attn_bias", bool(vc.get("attention_bias", False))), ("qk_norm", bool(vc.get("use_qk_norm", False))),
        ("post_norm", post_norm), ("feature", feature(layer, strategy))]
    if weights is not None:
        out.append(("weights", weights))
    return out


def vision_block(vc: dict[str, Any], name: str = "vit", *, layer: Any = -1, strategy: str = "default",
                 weights: str | None = None) -> str:
    """`  vision NAME = internvit { ... }`, as a format's `read` writes its blocks."""
    body = fields(vision_fields(vc, layer=layer, strategy=strategy, weights=weights))
    return f"  vision {name} = internvit {{\n{body}\n  }}"

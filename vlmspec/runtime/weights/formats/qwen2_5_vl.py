"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL plus deltas, read as such.

What differs from Qwen2-VL (`qwen2_vl.py`, whose readers this module reuses): the ViT normalises with
RMSNorm (`norm = rms`), its MLP is a biased SwiGLU (`gated_mlp = true`, `act = silu`, width
`intermediate_size`), and it attends within windows of `window_size` pixels (`window`) except in
`fullatt_block_indexes` (`full_layers`); the merger's norm is RMSNorm (`norm = rms`). The text model is
Qwen2 with M-RoPE, images numbered as in Qwen2-VL; a video's time ids advance `tokens_per_second` per second
(`video = frames(tokens_per_second = ...)`, see `vlmspec.runtime.weights.video_fields`).

Keys, as `save_pretrained` writes them in transformers 5: `model.visual.blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.gate_proj, mlp.up_proj, mlp.down_proj}`, `model.visual.merger.{ln_q, mlp.0, mlp.2}`,
`model.language_model.*`, `lm_head`; older folders keep `visual.*` and `model.*` at the top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmspec.compiler.schema.vision import DynamicResolution
from vlmspec.runtime.weights.families import lay
from vlmspec.runtime.weights.formats.base import (
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.blip2 import RESAMPLE_CODE, components
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.formats.qwen2_vl import (
    _filter,
    _language_block,
    _preprocessor,
    _text_config,
    _vision_layout,
    family,
    image_side,
    pixel_range,
)
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need
from vlmspec.runtime.weights.video_fields import frames_field, video_processor_file

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

_NAME = "qwen2_5_vl"


def _window(vc: dict[str, Any], patch: int, merge: int, depth: int) -> tuple[int, list[int]]:
    """(window in pixels, full-attention layers). Qwen2.5-VL cuts windows of `window_size // merge // patch`
    merged tokens a side; vlmspec's `window` counts pixels in whole patches, so the same windows are
    `window_size // (patch * merge) * patch * merge` pixels."""
    size = int(vc.get("window_size", 112))
    units = size // merge // patch
    need(units >= 1, f"a window of {size} pixels, under one merged token of {patch * merge} pixels")
    full = [int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))]
    need(all(0 <= i < depth for i in full) and len(set(full)) == len(full),
         f"fullatt_block_indexes {full} for a depth of {depth}")
    return units * patch * merge, full


def _vision_fields(vc: dict[str, Any], pre: dict[str, Any], patch: int, merge: int) -> list[tuple[str, Any]]:
    """The `vit` block's attributes: Qwen2-VL's tower with RMSNorm, a SwiGLU MLP and window attention."""
    act = vc.get("hidden_act", "silu")
    need(act in VISION_ACT, f"vision activation {act}")
    vrope = vc.get("rope_parameters") or {}
    need(float(vrope.get("rope_theta", 10000.0)) == 10000.0, "a vision rotary theta other than 10000")
    width, heads, depth = int(vc.get("hidden_size", 1280)), int(vc.get("num_heads", 16)), int(vc.get("depth", 32))
    need(width % heads == 0 and (width // heads) % 4 == 0, f"vision head width {width}/{heads} (2-D rotary needs "
         "a multiple of 4)")
    window, full = _window(vc, patch, merge, depth)
    return [
        ("image_size", image_side(pre, patch * merge)), ("patch_size", patch),
        ("temporal_patch", int(vc.get("temporal_patch_size", 2))), ("channels", int(vc.get("in_channels", 3))),
        ("width", width), ("depth", depth), ("heads", heads), ("mlp", int(vc.get("intermediate_size", 3420))),
        ("act", VISION_ACT[act]), ("norm", "rms"), ("norm_eps", 1e-6), ("gated_mlp", True),
        ("window", window), ("full_layers", Raw(f"[{', '.join(map(str, full))}]")), ("position", "rope2d"),
        ("resize", _filter(pre)),
        ("resolution", Raw("dynamic(min_pixels = {}, max_pixels = {})".format(*pixel_range(pre)))),
        ("class_token", False), ("pre_norm", False), ("post_norm", False), ("feature", "layer(-1).patches")]


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config.get("vision_config") or {}, _text_config(config)
    pre = _preprocessor(folder)
    patch, merge = int(vc.get("patch_size", 14)), int(vc.get("spatial_merge_size", 2))
    need(pre.get("patch_size", patch) == patch and pre.get("merge_size", merge) == merge,
         "a preprocessor whose patch_size / merge_size differ from the vision config's")
    out_width = int(vc.get("out_hidden_size", tc["hidden_size"]))
    need(out_width == tc["hidden_size"], f"a merger output width {out_width} other than the text width "
         f"{tc['hidden_size']}")
    vision = _vision_fields(vc, pre, patch, merge)
    side = dict(vision)["image_size"]
    mean, std = pre.get("image_mean"), pre.get("image_std")
    raw_vision = [f"    mean = {list(map(float, mean))}", f"    std = {list(map(float, std))}"] if mean and std else []
    vision.append(frames_field(config, folder, int(tc["max_position_embeddings"]),
                               tokens_per_second=float(vc.get("tokens_per_second", 4))))
    vision.append(("weights", f"{folder}#vision"))
    merger = fields([("merge", merge), ("layers", 2), ("act", "gelu"), ("norm", "rms"),
                     ("weights", f"{folder}#merger")])
    tokens = (side // (patch * merge)) ** 2
    note = (f"  # Images keep their own size inside [min_pixels, max_pixels]: `vlm generate`, `vlm serve` and `vlm eval`\n"
            f"  # resize each as Qwen2.5-VL's processor does (aspect ratio kept, sides multiples of {patch * merge}); training\n"
            f"  # feeds {side} x {side} ({tokens} tokens each), a size Qwen2.5-VL's processor keeps as it is.\n")
    return [
        note + f"  vision vit = vit {{\n{fields(vision)}\n" + "".join(f"{r}\n" for r in raw_vision) + "  }",
        f"  connector merger = patch_merger(vit -> llm) {{\n{merger}\n  }}",
        _language_block(config, tc, f"{folder}#language"),
        f"  fusion prefix(merger -> llm) {{\n{fields([('image_token', '<|image_pad|>')])}\n  }}",
    ], int(config.get("image_token_id", config.get("image_token_index", 151655)))


# ---------------------------------------------------------------- export (`vlm export-hf`)

#: the `vit` attributes Qwen2.5-VL's vision config carries; every other one must hold Qwen2.5-VL's value
_VIT = {"image_size", "patch_size", "channels", "width", "depth", "heads", "mlp", "act", "resolution",
        "temporal_patch", "window", "full_layers", "mean", "std", "resize", "weights", "dtype", "video"}
_VIT_FIXED = {"position": "rope2d", "class_token": False, "pre_norm": False, "post_norm": False, "norm": "rms",
              "norm_eps": 1e-6, "gated_mlp": True}
_LLAMA = {"width", "depth", "heads", "kv_heads", "ffn", "vocab", "max_positions", "norm_eps", "rope_theta", "rope",
          "tie_embeddings", "weights", "tokenizer", "dtype"}


def claims(ir: ModelIR) -> bool:
    """A patch merger behind a tower with Qwen2.5-VL's deltas (RMSNorm, a gated MLP or windows); a Qwen2-VL
    tower is the `qwen2_vl` format's. What does not fit is said by `write`."""
    vis = ir.by_role("vision")
    return [c.kind for c in ir.by_role("connector")] == ["patch_merger"] and len(vis) == 1 and \
        any((vis[0].config.norm == "rms", vis[0].config.gated_mlp, vis[0].config.window))


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, "Qwen2.5-VL is one rope2d `vit` with RMSNorm, a gated MLP and windows of "
                 "whole merged tokens, a 2-layer RMSNorm `patch_merger`, a `llama` with M-RoPE and a causal "
                 "`prefix` fusion, unquantized")


def _vision(vis: Component, merge: int, out: int) -> dict[str, Any]:
    v = vis.config
    _fit(vis.kind == "vit", f"vision `{vis.name}` ({vis.kind})")
    refuse_unplaced(vis, _fit, _VIT, _VIT_FIXED)
    _fit(isinstance(v.resolution, DynamicResolution), f"vision `{vis.name}` at a fixed resolution")
    _fit(v.act in ACT_HF, f"vision `{vis.name}` with act = {v.act}")
    unit = v.patch_size * merge
    _fit(v.window > 0 and v.window % unit == 0, f"vision `{vis.name}` with window = {v.window} (Qwen2.5-VL's "
         f"windows are whole merged tokens: a multiple of {unit} pixels)")
    return {"depth": v.depth, "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_heads": v.heads,
            "in_channels": v.channels, "patch_size": v.patch_size, "spatial_merge_size": merge,
            "temporal_patch_size": v.temporal_patch, "window_size": v.window,
            "fullatt_block_indexes": list(v.full_layers), "out_hidden_size": out, "hidden_act": ACT_HF[v.act]}


def _merger(con: Component, vis: Component) -> int:
    c = con.config
    _fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {', '.join(con.sources)}")
    refuse_unplaced(con, _fit, {"merge", "weights", "dtype"}, {"layers": 2, "act": "gelu", "norm": "rms"})
    return int(c.merge)


def _text(lm: Component, session: Session) -> dict[str, Any]:
    t = lm.config
    _fit(lm.kind == "llama" and not isinstance(t.rope, str), f"language model `{lm.name}` ({lm.kind}, M-RoPE)")
    refuse_unplaced(lm, _fit, _LLAMA, {"qkv_bias": True, "act": "silu"})
    return {"model_type": "qwen2_5_vl_text", "vocab_size": t.vocab, "hidden_size": t.width,
            "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "num_key_value_heads": t.n_kv, "max_position_embeddings": t.max_positions, "rms_norm_eps": t.norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": t.tie_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.rope.sections)}, **special_token_ids(session)}


def _token(session: Session, text: str, default: int) -> int:
    tok = session.tokenizer
    got = tok.convert_tokens_to_ids(text) if tok is not None else None
    return int(got) if isinstance(got, int) and got != getattr(tok, "unk_token_id", None) else default


def _processor(vis: Component, merge: int) -> dict[str, Any]:
    """`preprocessor_config.json`: Qwen2VLImageProcessor with the spec's pixel range, filter, mean and std."""
    v = vis.config
    lo, hi = v.resolution.min_pixels, v.resolution.max_pixels
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "min_pixels": lo, "max_pixels": hi, "size": {"shortest_edge": lo, "longest_edge": hi},
            "patch_size": v.patch_size, "merge_size": merge, "temporal_patch_size": v.temporal_patch,
            "resample": RESAMPLE_CODE[v.resize], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std), "do_convert_rgb": True}


def write(session: Session) -> Export:
    """The Qwen2.5-VL checkpoint of a Qwen2.5-VL-shaped model, in the layout `save_pretrained` writes
    (`visual.*`, `model.*`, `lm_head`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = components(ir, _fit)
    merge = _merger(con, vis)
    text = _text(lm, session)
    _fit(fus.kind == "prefix" and list(fus.sources) == [con.name], f"fusion `{fus.name}` ({fus.kind})")
    refuse_unplaced(fus, _fit, {"tokens", "image_token"}, {"prefix_attention": "causal"})
    image_id = int(session.model.image_token_id)
    _fit(image_id < lm.config.vocab, f"image token id {image_id} outside the vocabulary of {lm.config.vocab}")
    config = {"model_type": _NAME, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
              "vision_config": _vision(vis, merge, lm.config.width), "text_config": text,
              "image_token_id": image_id, "video_token_id": _token(session, "<|video_pad|>", 151656),
              "vision_start_token_id": _token(session, "<|vision_start|>", 151652),
              "vision_end_token_id": _token(session, "<|vision_end|>", 151653),
              "tie_word_embeddings": lm.config.tie_embeddings}
    layouts = {vis.name: _vision_layout("visual."), con.name: lay(("visual.merger.", "")),
               lm.name: lay(("model.", "model."), ("lm_head.", "lm_head."))}
    if session.tokenizer is None:  # no processor without a tokenizer: the exporter writes weights and config
        return Export(config, layouts)
    files = {"preprocessor_config.json": _processor(vis, merge),
             "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"}}
    video = video_processor_file(vis.config, merge, "Qwen2_5_VLProcessor")
    if video is not None:  # the spec's `frames(...)` as transformers' video processor reads it
        files["video_preprocessor_config.json"] = video
    return Export(config, layouts, files)


FORMAT = VLMFormat(
    model_types=("qwen2_5_vl",),
    family=family("qwen2_5_vl"),
    components={"vit": "vision", "merger": "merger", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="Qwen2_5_VLForConditionalGeneration",
    processor='`Qwen2_5_VLProcessor`: `Qwen2VLImageProcessor` (each image at its own size in [min_pixels, max_pixels])',
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

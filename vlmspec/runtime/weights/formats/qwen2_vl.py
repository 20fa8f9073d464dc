"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): a ViT with 2-D rotary positions and 3-D (2-frame) patches,
the 2x2 patch merger, a Qwen2 text model with multimodal rotary positions (M-RoPE), prefix fusion.

Qwen2-VL reads each image at its own resolution: the spec says `resolution = dynamic(min_pixels, max_pixels)`
(the processor's range) and the model takes any image whose sides are multiples of patch_size x merge,
numbering its tokens for M-RoPE on the grid the merger gives it, as `get_rope_index` does. `image_size`
is the size vlmspec's own processor feeds (a square inside that range, which Qwen2-VL's processor keeps
as it is).

Keys: the vision tower is `visual.patch_embed.proj`, `visual.blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}` (under `model.` since transformers 4.52); a rope2d `vit` keeps its own key names
(`embeddings.patch_embedding`, `encoder.layers.N.self_attn.qkv`, ...), so the vision part's layout
renames inside the key as well as mapping the prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlmspec.runtime.weights.families import Layout, MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import LLAVA_LM, VLMFormat
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need

#: Merged tokens per side of the default image (448 x 448 pixels for Qwen2-VL's 14-pixel patches).
DEFAULT_MERGED_SIDE = 16


@dataclass(frozen=True, slots=True)
class RenamedLayout(Layout):
    """A prefix layout whose keys are also renamed inside: (ours, theirs) substring pairs applied to the
    checkpoint key the prefix rules give (`.self_attn.qkv.` -> `.attn.qkv.`)."""

    renames: tuple[tuple[str, str], ...] = ()

    def to_checkpoint(self, key: str) -> str | None:
        out = Layout.to_checkpoint(self, key)
        if out is None:
            return None
        for ours, theirs in self.renames:
            out = out.replace(ours, theirs)
        return out


_VISION_RENAMES = ((".self_attn.qkv.", ".attn.qkv."), (".self_attn.projection.", ".attn.proj."),
                   (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."))


def _vision_layout(prefix: str) -> RenamedLayout:
    return RenamedLayout(((f"{prefix}blocks.", "encoder.layers."),
                          (f"{prefix}patch_embed.proj.", "embeddings.patch_embedding.")), _VISION_RENAMES)


def _preprocessor(folder: str) -> dict[str, Any]:
    """preprocessor_config.json, or the image processor inside transformers 5's processor_config.json."""
    return image_processor(folder)


def _filter(pre: dict[str, Any]) -> str:
    """The resize filter (Qwen2VLImageProcessor's bicubic by default); refused: no rescale by 1/255, no
    normalisation, no resize (vlmspec resizes as `smart_resize` does)."""
    need(pre.get("do_resize", True), "a processor that does not resize (`do_resize = false`)")
    factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 0.0
    need(abs(factor * 255 - 1) < 1e-6, f"processor rescale {factor} (vlmspec scales by 1/255)")
    need(pre.get("do_normalize", True), "a processor that does not normalise (`do_normalize = false`)")
    resample = pre.get("resample", 3)
    need(resample in RESAMPLE, f"processor resample filter {resample}")
    return RESAMPLE[resample]


#: Qwen2VLImageProcessor's defaults: 56 x 56 to 1280 merged 28 x 28 tokens
DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)


def pixel_range(pre: dict[str, Any]) -> tuple[int, int]:
    """[min_pixels, max_pixels] of the processor (its defaults when the folder has no preprocessor file)."""
    size = pre.get("size") or {}
    lo = int(pre.get("min_pixels") or size.get("shortest_edge") or DEFAULT_PIXELS[0])
    hi = int(pre.get("max_pixels") or size.get("longest_edge") or DEFAULT_PIXELS[1])
    need(0 < lo <= hi, f"a processor pixel range [{lo}, {hi}]")
    return lo, hi


def image_side(pre: dict[str, Any], factor: int) -> int:
    """The fixed image side: DEFAULT_MERGED_SIDE merged tokens a side, brought inside the processor's
    [min_pixels, max_pixels] (a square image of that side, a multiple of `factor`, passes the
    processor's resize unchanged)."""
    size = pre.get("size") or {}
    lo = int(pre.get("min_pixels") or size.get("shortest_edge") or 0)
    hi = int(pre.get("max_pixels") or size.get("longest_edge") or 0)
    side = factor * DEFAULT_MERGED_SIDE
    if hi and side * side > hi:
        side = math.isqrt(hi) // factor * factor
    if lo and side * side < lo:
        side = max(factor, math.isqrt(lo) // factor * factor)
        while side * side < lo:
            side += factor
    need(side >= factor and (not hi or side * side <= hi),
         f"no square image fits the processor's pixel range [{lo}, {hi}] at a multiple of {factor} pixels")
    return side


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # before transformers 4.52 the text fields sat at the top level of config.json
    return config.get("text_config") or config


def _mrope(config: dict[str, Any], tc: dict[str, Any]) -> tuple[list[int], float]:
    rp = tc.get("rope_parameters") or tc.get("rope_scaling") or config.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    need(kind in ("default", "mrope"), f"rope scaling `{kind}` of the text model")
    sections = rp.get("mrope_section")
    need(isinstance(sections, list) and len(sections) == 3, "a Qwen2-VL text model without `mrope_section`")
    theta = float(rp.get("rope_theta", tc.get("rope_theta", config.get("rope_theta", 1000000.0))))
    return [int(s) for s in sections], theta


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    vc, tc = config.get("vision_config") or {}, _text_config(config)
    pre = _preprocessor(folder)
    patch, merge = int(vc.get("patch_size", 14)), int(vc.get("spatial_merge_size", 2))
    need(pre.get("patch_size", patch) == patch and pre.get("merge_size", merge) == merge,
         "a preprocessor whose patch_size / merge_size differ from the vision config's")
    act = vc.get("hidden_act", "quick_gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    vrope = vc.get("rope_parameters") or {}
    need(float(vrope.get("rope_theta", 10000.0)) == 10000.0, "a vision rotary theta other than 10000")
    width, heads = int(vc.get("embed_dim", 1280)), int(vc.get("num_heads", 16))
    need(width % heads == 0 and (width // heads) % 4 == 0, f"vision head width {width}/{heads} (2-D rotary needs "
         "a multiple of 4)")
    out_width = int(vc.get("hidden_size", tc["hidden_size"]))
    need(out_width == tc["hidden_size"], f"a merger output width {out_width} other than the text width "
         f"{tc['hidden_size']}")
    side = image_side(pre, patch * merge)
    mean, std = pre.get("image_mean"), pre.get("image_std")
    vision: list[tuple[str, Any]] = [
        ("image_size", side), ("patch_size", patch), ("temporal_patch", int(vc.get("temporal_patch_size", 2))),
        ("channels", int(vc.get("in_channels", vc.get("in_chans", 3)))), ("width", width),
        ("depth", int(vc.get("depth", 32))), ("heads", heads), ("mlp", int(width * vc.get("mlp_ratio", 4))),
        ("act", VISION_ACT[act]), ("norm_eps", 1e-6), ("position", "rope2d"), ("resize", _filter(pre)),
        ("resolution", Raw("dynamic(min_pixels = {}, max_pixels = {})".format(*pixel_range(pre)))), ("class_token", False),
        ("pre_norm", False), ("post_norm", False), ("feature", "layer(-1).patches")]
    raw_vision = []
    if mean and std:
        raw_vision = [f"    mean = {list(map(float, mean))}", f"    std = {list(map(float, std))}"]
    vision.append(("weights", f"{folder}#vision"))
    merger = fields([("merge", merge), ("layers", 2), ("act", "gelu"), ("weights", f"{folder}#merger")])
    tokens = (side // (patch * merge)) ** 2
    note = (f"  # Images keep their own size inside [min_pixels, max_pixels]: `vlm generate` resizes each as Qwen2-VL's\n"
            f"  # processor does (aspect ratio kept, sides multiples of {patch * merge}); training and `vlm serve` feed "
            f"{side} x {side}\n  # ({tokens} tokens each), a size Qwen2-VL's processor keeps as it is.\n")
    return [
        note + f"  vision vit = vit {{\n{fields(vision)}\n" + "".join(f"{r}\n" for r in raw_vision) + "  }",
        f"  connector merger = patch_merger(vit -> llm) {{\n{merger}\n  }}",
        _language_block(config, tc, f"{folder}#language"),
        f"  fusion prefix(merger -> llm) {{\n{fields([('image_token', '<|image_pad|>')])}\n  }}",
    ], int(config.get("image_token_id", config.get("image_token_index", 151655)))


def _language_block(config: dict[str, Any], tc: dict[str, Any], weights: str) -> str:
    """Qwen2 with M-RoPE (`spec_text.language_block` writes no `rope = mrope(...)`)."""
    need(tc.get("hidden_act", "silu") == "silu", f"text activation {tc.get('hidden_act')}")
    need(not tc.get("use_sliding_window"), "sliding-window attention in the text model")
    heads = int(tc["num_attention_heads"])
    hd = int(tc["hidden_size"]) // heads
    sections, theta = _mrope(config, tc)
    need(2 * sum(sections) == hd, f"mrope_section {sections} for a head width of {hd} (they must sum to {hd // 2})")
    tie = bool(config.get("tie_word_embeddings") or tc.get("tie_word_embeddings"))
    pairs: list[tuple[str, Any]] = [
        ("width", tc["hidden_size"]), ("depth", tc["num_hidden_layers"]), ("heads", heads),
        ("kv_heads", tc.get("num_key_value_heads") or heads), ("ffn", tc["intermediate_size"]),
        ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"]),
        ("norm_eps", tc.get("rms_norm_eps", 1e-6)), ("rope_theta", theta), ("qkv_bias", True),
        ("tie_embeddings", tie), ("weights", weights)]
    rope = f"    rope = mrope(sections = [{', '.join(map(str, sections))}])"
    return f"  language llm = llama {{\n{fields(pairs)}\n{rope}\n  }}"


# Since transformers 4.52: `model.visual.*`, `model.language_model.*`, `lm_head`; before (and as 5.x still
# saves): `visual.*`, `model.*`, `lm_head`.
FORMAT = VLMFormat(
    model_types=("qwen2_vl",),
    family=MultiFamily("qwen2_vl", {
        "vision": Part("vision", (_vision_layout("model.visual."), _vision_layout("visual.")),
                       kinds=frozenset({"vit"})),
        "merger": Part("connector", (lay(("model.visual.merger.", "")), lay(("visual.merger.", ""))),
                       kinds=frozenset({"patch_merger"})),
        "language": Part("language", (LLAVA_LM[1], lay(("model.", "model."), ("lm_head.", "lm_head."))),
                         kinds=frozenset({"llama"})),
    }, {"vision": "vision", "connector": "merger", "language": "language"}),
    components={"vit": "vision", "merger": "merger", "llm": "language"},
    read=read,
)

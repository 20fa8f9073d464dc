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

Export (`vlm export-hf`): a rope2d `vit` at dynamic resolution -> a LayerNorm + 2-layer GELU `patch_merger` ->
a Qwen2 `llama` with `mrope` -> a causal `prefix` fusion, in the keys transformers 5 saves (`visual.*`,
`model.*`, `lm_head`); the processor files are Qwen2-VL's, which resize each image as `vlm generate` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.weights.families import Layout, MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    LLAVA_LM,
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need
from vlmspec.runtime.weights.video_fields import frames_field, video_processor_file

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

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
    vision.append(frames_field(config, folder, int(tc["max_position_embeddings"])))
    vision.append(("weights", f"{folder}#vision"))
    merger = fields([("merge", merge), ("layers", 2), ("act", "gelu"), ("weights", f"{folder}#merger")])
    tokens = (side // (patch * merge)) ** 2
    note = (f"  # Images keep their own size inside [min_pixels, max_pixels]: `vlm generate`, `vlm serve` and `vlm eval`\n"
            f"  # resize each as Qwen2-VL's processor does (aspect ratio kept, sides multiples of {patch * merge}); training\n"
            f"  # feeds {side} x {side} ({tokens} tokens each), a size Qwen2-VL's processor keeps as it is.\n")
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


# ------------------------------------------------------------------ export

_NAME = "Qwen2-VL"
_HINT = ("Qwen2-VL is one rope2d `vit` at `resolution = dynamic(...)`, a LayerNorm + 2-layer GELU `patch_merger`, "
         "a Qwen2 `llama` (q/k/v biases, SiLU) with `rope = mrope(...)` and a causal `prefix` fusion, unquantized")
#: the processor's placeholder (`Qwen2VLProcessor` expands it to each image's tokens) and the other tokens
#: Qwen2VLConfig names, written when the tokenizer has them
IMAGE_PAD = "<|image_pad|>"
_SPECIAL_IDS = {"video_token_id": "<|video_pad|>", "vision_start_token_id": "<|vision_start|>",
                "vision_end_token_id": "<|vision_end|>"}
#: attributes each config carries; every other attribute must keep the value Qwen2-VL fixes (or its kind's
#: default), see `unplaced_attribute`. `image_size` is carried as the side `read` derives from the pixel range.
_VIT = {"image_size", "patch_size", "temporal_patch", "width", "depth", "heads", "mlp", "act", "feature", "resolution",
        "mean", "std", "resize", "weights", "dtype", "video"}
_VIT_FIXED = {"position": "rope2d", "class_token": False, "pre_norm": False, "post_norm": False, "norm_eps": 1e-6}
_MERGER = {"merge", "hidden", "norm", "out", "weights", "dtype"}
_QWEN2 = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "max_positions", "norm_eps", "rope_theta",
          "rope", "tie_embeddings", "weights", "tokenizer", "dtype"}
#: vlmspec activation -> transformers' (the vision MLP's `hidden_act`)
_ACT_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
_RESAMPLE_CODE = {name: code for code, name in RESAMPLE.items()}


def _qwen25_vision(ir: ModelIR) -> bool:
    """Whether a tower has Qwen2.5-VL's traits (RMSNorm, a gated MLP, windows), which make the spec the
    `qwen2_5_vl` format's (an RMSNorm merger behind a Qwen2-VL tower stays ours, and is refused by `write`)."""
    return any(getattr(v, "norm", "layer") == "rms" or getattr(v, "gated_mlp", False) or getattr(v, "window", 0)
               for v in (c.config for c in ir.by_role("vision")))


def claims(ir: ModelIR) -> bool:
    """A `patch_merger` into a prefix fusion feeding an `mrope` language model: Qwen2-VL's shape (what does
    not fit is then said by `write`); one with Qwen2.5-VL's vision traits is left to that format."""
    lm = ir.language
    mrope = lm is not None and getattr(getattr(lm.config, "rope", None), "sections", None) is not None
    return [c.kind for c in ir.by_role("connector")] == ["patch_merger"] and \
        [f.kind for f in ir.by_role("fusion")] == ["prefix"] and mrope and not _qwen25_vision(ir)


def _fit(cond: bool, what: str) -> None:
    does_not_fit(cond, _NAME, what, _HINT)



def _components(ir: ModelIR) -> tuple[Component, Component, Component, Component]:
    """The one encoder, merger, language model and fusion Qwen2-VL has (E0586 for anything else)."""
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(v) == 1 for v in by.values()) and len(ir.components) == 4,
         "a model with other than one encoder, connector, language model and fusion")
    vis, con, lm, fus = (by[r][0] for r in ("vision", "connector", "language", "fusion"))
    for comp in (vis, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"`{comp.name}` with quantize = {q} (transformers would serve the unquantized weights)")
    return vis, con, lm, fus


def _nominal_side(lo: int, hi: int, factor: int) -> int | None:
    """The `image_size` `read` writes for this pixel range (None: no square image fits it)."""
    try:
        return image_side({"min_pixels": lo, "max_pixels": hi}, factor)
    except UserInputError:
        return None


def _vision(vis: Component, merge: int, out_width: int) -> dict[str, Any]:
    """`vision_config`: Qwen2-VL's tower (2-D rotary, 3-D patches, no class token or outer norms) and the
    merger's shape (`spatial_merge_size`, output `hidden_size`)."""
    v = vis.config
    _fit(vis.kind == "vit", f"vision `{vis.name}` ({vis.kind})")
    res = v.resolution
    _fit(not isinstance(res, str), f"vision `{vis.name}` with resolution = {res} (Qwen2-VL reads images at "
         "their own size: `resolution = dynamic(...)`)")
    _fit(list(v.feature.layers) in ([-1], [v.depth]), f"vision `{vis.name}` with feature = {v.feature.to_vlm()} "
         "(the merger reads the last layer, `layer(-1).patches`)")
    _fit(v.mlp_dim % v.width == 0, f"vision `{vis.name}` with mlp = {v.mlp_dim} (Qwen2-VL's MLP is a whole "
         f"multiple, `mlp_ratio`, of the width {v.width})")
    _fit(v.act in _ACT_HF, f"vision `{vis.name}` with act = {v.act}")
    factor = v.patch_size * merge
    side = _nominal_side(res.min_pixels, res.max_pixels, factor)
    _fit(side == v.image_size, f"vision `{vis.name}` with image_size = {v.image_size} (Qwen2-VL has no fixed "
         f"size; the one its pixel range [{res.min_pixels}, {res.max_pixels}] gives is "
         + (f"{side})" if side else "none)"))
    refuse_unplaced(vis, _fit, _VIT, _VIT_FIXED)
    return {"model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.width, "hidden_size": out_width,
            "hidden_act": _ACT_HF[v.act], "mlp_ratio": v.mlp_dim // v.width, "num_heads": v.heads,
            "in_channels": v.channels, "patch_size": v.patch_size, "spatial_merge_size": merge,
            "temporal_patch_size": v.temporal_patch}


def _merger(con: Component, vis: Component, out_width: int) -> None:
    """Qwen2-VL's `PatchMerger`: LayerNorm (eps 1e-6), merge x merge patches concatenated, GELU MLP of width
    merge^2 x the tower's, ending at the text width."""
    c = con.config
    _fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {', '.join(con.sources)}")
    merged = vis.config.width * c.merge**2
    _fit(c.norm in (True, "layer"), f"connector `{con.name}` with norm = {c.norm} (Qwen2-VL's merger has a "
         "LayerNorm)")
    _fit(c.layers == 2 and c.act == "gelu", f"connector `{con.name}` with layers = {c.layers}, act = {c.act} "
         "(Qwen2-VL's merger is 2 layers with GELU)")
    _fit(c.hidden in (None, merged), f"connector `{con.name}` with hidden = {c.hidden} (Qwen2-VL's is {merged})")
    _fit(c.out in (None, out_width), f"connector `{con.name}` with out = {c.out} (the text width is {out_width})")
    refuse_unplaced(con, _fit, _MERGER)


def _text(lm: Component, session: Session) -> dict[str, Any]:
    """`text_config`: Qwen2 (q/k/v biases, SiLU, heads that split the width) with M-RoPE."""
    t = lm.config
    _fit(lm.kind == "llama", f"language model `{lm.name}` ({lm.kind})")
    _fit(t.qkv_bias, f"language model `{lm.name}` without qkv_bias (Qwen2 has q/k/v biases)")
    _fit(t.hd * t.heads == t.width, f"language model `{lm.name}` with head_dim = {t.hd} (Qwen2-VL's heads split "
         f"its width {t.width})")
    rope = t.rope
    _fit(getattr(rope, "sections", None) is not None, f"language model `{lm.name}` with rope = "
         f"{rope if isinstance(rope, str) else rope.to_vlm()}")
    refuse_unplaced(lm, _fit, _QWEN2, {"qkv_bias": True})
    rope_parameters = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(rope.sections)}
    tok = session.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id} if tok is not None else {}
    return {"model_type": "qwen2_vl_text", "vocab_size": t.vocab, "hidden_size": t.width,
            "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "num_key_value_heads": t.n_kv, "max_position_embeddings": t.max_positions, "rms_norm_eps": t.norm_eps,
            "hidden_act": "silu", "use_sliding_window": False, "rope_parameters": rope_parameters,
            "tie_word_embeddings": t.tie_embeddings, **ids, **special_token_ids(session)}


def _fusion(fus: Component, con: Component, tokenizer: Any) -> None:
    """A causal prefix fusion whose placeholder is the one Qwen2VLProcessor expands (`<|image_pad|>`, or the
    tokenizer's own `image_token`)."""
    _fit(list(fus.sources) == [con.name], f"fusion `{fus.name}` reading {', '.join(fus.sources)}")
    named = getattr(tokenizer, "image_token", None)
    want = named if isinstance(named, str) and named else IMAGE_PAD
    _fit(fus.config.image_token == want, f"fusion `{fus.name}` with image_token = {fus.config.image_token!r} "
         f"(Qwen2-VL's processor expands `{want}`)")
    refuse_unplaced(fus, _fit, {"image_token"}, {"prefix_attention": "causal"})


def _token_ids(session: Session, image_id: int) -> dict[str, int]:
    """`image_token_id`, and the video / vision-start / vision-end ids of the tokens the tokenizer has."""
    out = {"image_token_id": image_id}
    tok = session.tokenizer
    if tok is None:
        return out
    vocab = tok.get_vocab()
    out.update({key: int(vocab[token]) for key, token in _SPECIAL_IDS.items() if token in vocab})
    return out


def processor_files(vis: Component, merge: int) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (Qwen2VLImageProcessor: `smart_resize` into the spec's pixel range at
    multiples of patch x merge with its filter, rescale, normalise with its mean and std, patches of
    `temporal_patch` frames; the range both as `size` and as the `min_pixels` / `max_pixels` older
    releases read) and `processor_config.json` (Qwen2VLProcessor)."""
    v = vis.config
    lo, hi = v.resolution.min_pixels, v.resolution.max_pixels
    image = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
             "do_resize": True, "size": {"shortest_edge": lo, "longest_edge": hi}, "min_pixels": lo,
             "max_pixels": hi, "resample": _RESAMPLE_CODE[v.resize], "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std), "do_convert_rgb": True,
             "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch, "merge_size": merge}
    return {"preprocessor_config.json": image, "processor_config.json": {"processor_class": "Qwen2VLProcessor"}}


def write(session: Session) -> Export:
    """The Qwen2-VL checkpoint of a Qwen2-VL-shaped model, in the layout transformers 5 saves (`visual.*`
    with Qwen2-VL's block names, `visual.merger.*`, `model.*`, `lm_head`)."""
    ir = session.analysis.ir
    vis, con, lm, fus = _components(ir)
    merge, width = con.config.merge, lm.config.width
    config = {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
              "vision_config": _vision(vis, merge, width), "text_config": _text(lm, session),
              "tie_word_embeddings": lm.config.tie_embeddings}
    _merger(con, vis, width)
    _fusion(fus, con, session.tokenizer)
    image_id = int(session.model.image_token_id)
    _fit(0 <= image_id < lm.config.vocab, f"image token id {image_id} outside the vocabulary of {lm.config.vocab}")
    config.update(_token_ids(session, image_id))
    layouts = {vis.name: _vision_layout("visual."), con.name: lay(("visual.merger.", "")),
               lm.name: lay(("model.", "model."), ("lm_head.", "lm_head."))}
    files = processor_files(vis, merge)
    video = video_processor_file(vis.config, merge, "Qwen2VLProcessor")
    if video is not None:  # the spec's `frames(...)` as transformers' video processor reads it
        files["video_preprocessor_config.json"] = video
    return Export(config, layouts, files)


def family(model_type: str) -> MultiFamily:
    """The parts and key layouts of Qwen2-VL, which Qwen2.5-VL shares. Since transformers 4.52:
    `model.visual.*`, `model.language_model.*`, `lm_head`; before (and as 5.x still saves): `visual.*`,
    `model.*`, `lm_head`."""
    return MultiFamily(model_type, {
        "vision": Part("vision", (_vision_layout("model.visual."), _vision_layout("visual.")),
                       kinds=frozenset({"vit"})),
        "merger": Part("connector", (lay(("model.visual.merger.", "")), lay(("visual.merger.", ""))),
                       kinds=frozenset({"patch_merger"})),
        "language": Part("language", (LLAVA_LM[1], lay(("model.", "model."), ("lm_head.", "lm_head."))),
                         kinds=frozenset({"llama"})),
    }, {"vision": "vision", "connector": "merger", "language": "language"})


FORMAT = VLMFormat(
    model_types=("qwen2_vl",),
    family=family("qwen2_vl"),
    components={"vit": "vision", "merger": "merger", "llm": "language"},
    read=read,
    claims=claims,
    write=write,
    hf_class="Qwen2VLForConditionalGeneration",
    processor='`Qwen2VLProcessor`: `Qwen2VLImageProcessor` (each image at its own size in [min_pixels, max_pixels])',
    chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where exact; exported",
)

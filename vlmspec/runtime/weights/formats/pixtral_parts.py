"""Pixtral's vision tower and processor as the two formats that hold it read and write them: LLaVA with a
`pixtral` vision_config (mistral-community/pixtral-12b) and Mistral 3 (`mistral3`). No `FORMAT` here: this
module is a part both formats share.

The tower's keys are transformers' own (`patch_conv`, `ln_pre`, `transformer.layers.N...`), which the
`pixtral` runtime keeps, so its key layout is the tower's prefix alone. `PixtralImageProcessor`'s
`size.longest_edge` is the spec's `image_size`; `PixtralProcessor`'s image, break and end tokens are the
fusion's `image_token` and the encoder's `break_token` / `end_token`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor, read_json
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need

#: PixtralProcessor's tokens and PixtralImageProcessor's settings where the folder says nothing
IMAGE, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_RESAMPLE_HF = {v: k for k, v in RESAMPLE.items()}


def processor_tokens(folder: str) -> tuple[str, str, str]:
    """(image, break, end) tokens of the folder's PixtralProcessor (`processor_config.json`)."""
    proc = read_json(Path(folder) / "processor_config.json")
    return (str(proc.get("image_token", IMAGE)), str(proc.get("image_break_token", BREAK)),
            str(proc.get("image_end_token", END)))


def rope_base(vc: dict[str, Any]) -> float:
    rp = vc.get("rope_parameters") or {}
    need(rp.get("rope_type", "axial") in ("axial", "default"), f"Pixtral rope type {rp.get('rope_type')}")
    return float(rp.get("rope_theta", vc.get("rope_theta", 10000.0)))


def vision_block(vc: dict[str, Any], folder: str, layer: int | list[int], weights: str, unit: int) -> str:
    """`vision vit = pixtral { }` of a Pixtral vision_config and the folder's image processor; `unit` is the
    size the processor rounds image sides to (patch x the merger's merge)."""
    need(vc.get("model_type", "pixtral") == "pixtral", f"vision tower `{vc.get('model_type')}` (Pixtral)")
    act = vc.get("hidden_act", "gelu")
    need(act in VISION_ACT, f"vision activation {act}")
    patch = vc.get("patch_size", 16)
    need(isinstance(patch, int), f"a non-square Pixtral patch {patch}")
    width, heads = vc.get("hidden_size", 1024), vc.get("num_attention_heads", 16)
    hd = vc.get("head_dim")
    need(hd in (None, width // heads), f"a Pixtral head_dim {hd} other than hidden_size / heads")
    pre = image_processor(folder)
    size = pre.get("size") or {}
    longest = int(size.get("longest_edge", vc.get("image_size", 1024))) if isinstance(size, dict) else int(size)
    need(isinstance(size, dict) and ("longest_edge" in size or not size),
         f"a Pixtral processor size {size} (PixtralImageProcessor resizes by `longest_edge`)")
    # the image processor's own `patch_size` is not read: PixtralProcessor always passes it patch x merge
    need(pre.get("do_resize", True) and pre.get("do_normalize", True) and pre.get("do_rescale", True),
         "a Pixtral processor that does not resize, rescale and normalise")
    need(abs(float(pre.get("rescale_factor", 1 / 255)) * 255 - 1) < 1e-6, "a rescale factor other than 1/255")
    need(longest % unit == 0, f"a longest edge {longest} that is not whole {unit}-pixel units")
    resample = pre.get("resample", 3)
    need(resample in RESAMPLE, f"processor resample filter {resample}")
    _, brk, end = processor_tokens(folder)
    feature = f"layer({layer}).patches" if isinstance(layer, int) else f"layers({list(layer)}).patches"
    pairs = [("image_size", longest), ("patch_size", patch), ("width", width),
             ("depth", vc.get("num_hidden_layers", 24)), ("heads", heads), ("mlp", vc.get("intermediate_size", 4096)),
             ("act", VISION_ACT[act]), ("rope_theta", rope_base(vc)), ("feature", Raw(feature)),
             ("resize", RESAMPLE[resample]),
             ("mean", Raw(str([float(x) for x in pre.get("image_mean", CLIP_MEAN)]))),
             ("std", Raw(str([float(x) for x in pre.get("image_std", CLIP_STD)])))]
    if brk != BREAK:
        pairs.append(("break_token", brk))
    if end != END:
        pairs.append(("end_token", end))
    pairs.append(("weights", weights))
    return f"  vision vit = pixtral {{\n{fields(pairs)}\n  }}"


def vision_config(v: Any) -> dict[str, Any]:
    """The `pixtral` encoder's transformers `vision_config`."""
    from vlmspec.runtime.weights.formats.llava import ACT_HF

    return {"model_type": "pixtral", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "num_channels": v.channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": ACT_HF[v.act],
            "head_dim": v.width // v.heads, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}


def processor_files(v: Any, image_token: str, merge: int) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (PixtralImageProcessor) and `processor_config.json` (PixtralProcessor)."""
    image = {"image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
             "do_resize": True, "size": {"longest_edge": v.image_size},
             "patch_size": {"height": v.patch_size, "width": v.patch_size}, "resample": _RESAMPLE_HF[v.resize],
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean),
             "image_std": list(v.std), "do_convert_rgb": True}
    processor = {"processor_class": "PixtralProcessor", "patch_size": v.patch_size, "spatial_merge_size": merge,
                 "image_token": image_token, "image_break_token": v.break_token, "image_end_token": v.end_token}
    return {"preprocessor_config.json": image, "processor_config.json": processor}

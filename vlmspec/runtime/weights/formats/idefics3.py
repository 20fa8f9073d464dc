"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`): a SigLIP tower
read tile by tile, a pixel shuffle into one bias-free linear projection, a Llama text model, image tokens in place
of the prompt's `<image>` runs. The processor resizes an image to a longest edge, cuts it into tower-sized tiles
plus a global image, and writes each tile's tokens after its own marker text.

In a spec that is a `siglip` with `layout = split(longest_edge = N, tiles = ...)` (and the processors'
`resize = lanczos`), a `pixel_shuffle(...) { scale = s  norm = false  layers = 1  bias = false }` and a `llama`. The two model types
differ only in names (SmolVLM's processor also reads videos, which vlmspec does not), so one module holds both.

Why the tower is a plain `siglip`: Idefics3's vision embeddings give each patch a position bucketed from its
fractional coordinate among the image's real patches. Every tile the processor makes is a full `image_size`
square (the longest-edge resize rounds both sides up to whole tiles; the global image is resized to one tile),
so the real patches are the whole grid and the bucketed positions are exactly the learned positions in order;
zero frames that pad a batch's image count are dropped before the tower, as vlmspec never encodes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import (
    Export,
    VLMFormat,
    does_not_fit,
    refuse_unplaced,
    special_token_ids,
)
from vlmspec.runtime.weights.formats.llava import ACT_HF
from vlmspec.runtime.weights.hf_folder import RESAMPLE, image_processor, read_json
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, language_block, need, tie

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

_VISION = lay(("model.vision_model.", ""))
_PROJECTOR = lay(("model.connector.modality_projection.proj.", "linear_1."))
_LM = lay(("model.text_model.", "model."), ("lm_head.", "lm_head."))
_RESAMPLE_CODE = {name: code for code, name in RESAMPLE.items()}


@dataclass(frozen=True, slots=True)
class Names:
    """What Idefics3 and SmolVLM call their classes (the rest of the layout is one)."""

    title: str
    model_type: str
    prefix: str  # of the config / processor classes: "Idefics3", "SmolVLM"

    def hint(self) -> str:
        return (f"{self.title} is one `siglip` (feature the post-LayerNorm's last layer) with `layout = split(...)`, "
                "a `pixel_shuffle` with norm = false, layers = 1, bias = false, a `llama` and a causal `prefix` fusion")


IDEFICS3 = Names("Idefics3", "idefics3", "Idefics3")
SMOLVLM = Names("SmolVLM", "smolvlm", "SmolVLM")


# ------------------------------------------------------------------ import


def _longest(pre: dict[str, Any], key: str) -> int | None:
    """`{"longest_edge": n}` of the image processor's `key` (None when absent)."""
    value = pre.get(key)
    if value is None:
        return None
    need(isinstance(value, dict) and set(value) == {"longest_edge"}, f"processor {key} {value} (vlmspec reads "
         "`{\"longest_edge\": N}`)")
    return int(value["longest_edge"])


def vision_fields(vc: dict[str, Any], folder: str) -> list[tuple[str, Any]]:
    """The `siglip` block's fields: the tower from `vision_config`, the split layout, filter and normalisation
    from the image processor. Refused: a tile (`max_image_size`) other than the tower's size, which would give
    the tower partial grids whose bucketed positions are not its learned ones."""
    size, patch = int(vc.get("image_size", 224)), int(vc.get("patch_size", 32))
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    need(act in VISION_ACT, f"vision activation {act}")
    pre = image_processor(folder)
    tile = _longest(pre, "max_image_size") or size
    need(tile == size, f"a processor tile (max_image_size) {tile} other than the vision model's image_size {size}")
    edge = _longest(pre, "size") or 4 * size
    need(pre.get("do_resize", True), "a processor that does not resize (`do_resize = false`)")
    need(pre.get("do_rescale", True) and abs(float(pre.get("rescale_factor", 1 / 255)) * 255 - 1) < 1e-6,
         "a processor that does not rescale by 1/255")
    need(pre.get("do_normalize", True), "a processor that does not normalise (`do_normalize = false`)")
    need(pre.get("do_convert_rgb", True) is not False, "a processor that keeps non-RGB images")
    resample = pre.get("resample", 1)
    need(resample in RESAMPLE, f"processor resample filter {resample}")
    splitting = bool(pre.get("do_image_splitting", True))
    mean, std = pre.get("image_mean", [0.5, 0.5, 0.5]), pre.get("image_std", [0.5, 0.5, 0.5])
    return [("image_size", size), ("patch_size", patch), ("width", vc.get("hidden_size", 1152)),
            ("depth", vc.get("num_hidden_layers", 12)), ("heads", vc.get("num_attention_heads", 16)),
            ("mlp", vc.get("intermediate_size", 3072)), ("act", VISION_ACT[act]),
            ("norm_eps", vc.get("layer_norm_eps", 1e-6)),
            ("layout", Raw(f"split(longest_edge = {edge}, tiles = {'true' if splitting else 'false'})")),
            ("resize", RESAMPLE[resample]), ("mean", Raw(str([float(x) for x in mean]))),
            ("std", Raw(str([float(x) for x in std]))), ("weights", f"{folder}#vision")]


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int]:
    """The spec blocks of an Idefics3 / SmolVLM folder, and its image token id."""
    vc, tc = config.get("vision_config") or {}, config.get("text_config") or {}
    need(vc.get("num_channels", 3) == 3, f"a vision tower of {vc.get('num_channels')} channels")
    tc = {"model_type": "llama", "rms_norm_eps": 1e-5, **tc}
    need(tc["model_type"] == "llama", f"{config.get('model_type')} text model `{tc['model_type']}` (vlmspec reads "
         "Llama)")
    scale = int(config.get("scale_factor", 2))
    grid = int(vc.get("image_size", 224)) // int(vc.get("patch_size", 32))
    need(grid % scale == 0, f"scale_factor {scale} that does not divide the {grid} x {grid} patch grid")
    per_tile = (grid // scale) ** 2
    seq = read_json(Path(folder) / "processor_config.json").get("image_seq_len")
    need(seq in (None, per_tile), f"a processor image_seq_len {seq} other than the {per_tile} tokens a tile gives")
    proj = fields([("scale", scale), ("norm", False), ("layers", 1), ("bias", False), ("weights", f"{folder}#projector")])
    return [
        f"  vision siglip = siglip {{\n{fields(vision_fields(vc, folder))}\n  }}",
        f"  connector proj = pixel_shuffle(siglip -> llm) {{\n{proj}\n  }}",
        language_block(tc, f"{folder}#language", tie(config, tc), head_bias=False),
        "  fusion prefix(proj -> llm)",
    ], int(config.get("image_token_id", 128257))


# ------------------------------------------------------------------ export

# attributes carried into the checkpoint; every other must hold the kind's default or the value fixed here
_TOWER = {"image_size", "patch_size", "width", "depth", "heads", "mlp", "act", "norm_eps", "layout", "mean", "std",
          "resize", "weights", "dtype"}
_SHUFFLE = {"scale", "out", "weights", "dtype", "act"}
_SHUFFLE_FIXED = {"norm": False, "layers": 1, "bias": False}
_LLAMA = {"width", "depth", "heads", "kv_heads", "head_dim", "ffn", "vocab", "max_positions", "norm_eps", "rope_theta",
          "rope", "tie_embeddings", "weights", "tokenizer", "dtype"}


def claims(ir: ModelIR) -> bool:
    """A split-laid-out encoder into a pixel shuffle into a prefix fusion: this family's shape."""
    from vlmspec.compiler.schema.tile_layouts import Split

    return [c.kind for c in ir.by_role("connector")] == ["pixel_shuffle"] and \
        [c.kind for c in ir.by_role("fusion")] == ["prefix"] and \
        any(isinstance(getattr(v.config, "layout", None), Split) for v in ir.by_role("vision"))


def _parts(session: Session, names: Names) -> tuple[Component, Component, Component, Component]:
    ir = session.analysis.ir
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    does_not_fit(all(len(v) == 1 for v in by.values()), names.title,
                 "a model with other than one encoder, connector, language model and fusion", names.hint())
    return by["vision"][0], by["connector"][0], by["language"][0], by["fusion"][0]


def _vision_config(vis: Component, names: Names) -> dict[str, Any]:
    v = vis.config

    def fit(cond: bool, what: str) -> None:
        does_not_fit(cond, names.title, what, names.hint())

    fit(vis.kind == "siglip", f"vision `{vis.name}` ({vis.kind})")
    fit(list(v.feature.layers) == [-1] and not v.feature.pooled and v.feature_norm,
        f"vision `{vis.name}` with feature = {v.feature.to_vlm() if hasattr(v.feature, 'to_vlm') else v.feature}, "
        f"feature_norm = {str(v.feature_norm).lower()} ({names.title} reads the last layer after the post-LayerNorm)")
    refuse_unplaced(vis, fit, _TOWER)
    return {"model_type": f"{names.model_type}_vision", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "num_channels": v.channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": ACT_HF[v.act],
            "layer_norm_eps": v.norm_eps}


def _text_config(lm: Component, session: Session, names: Names) -> dict[str, Any]:
    t = lm.config

    def fit(cond: bool, what: str) -> None:
        does_not_fit(cond, names.title, what, names.hint())

    fit(lm.kind == "llama", f"language model `{lm.name}` ({lm.kind})")
    refuse_unplaced(lm, fit, _LLAMA)
    from vlmspec.compiler.schema.language import Llama3RoPE

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope != "default":
        r = t.rope
        fit(isinstance(r, Llama3RoPE), f"language model `{lm.name}` with rope = {r.to_vlm()}")
        rope = {"rope_type": "llama3", "rope_theta": t.rope_theta, "factor": r.factor,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_positions}
    out = {"model_type": "llama", "vocab_size": t.vocab, "hidden_size": t.width, "intermediate_size": t.ffn,
           "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "num_key_value_heads": t.n_kv,
           "head_dim": t.hd, "max_position_embeddings": t.max_positions, "rms_norm_eps": t.norm_eps,
           "rope_parameters": rope, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "tie_word_embeddings": t.tie_embeddings}
    out.update(special_token_ids(session))
    return out


def _processor_files(vis: Component, per_tile: int, names: Names) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (the image processor cutting images as the split layout does) and
    `processor_config.json` (the tokens of one tile)."""
    v = vis.config
    layout = v.layout
    image = {"image_processor_type": f"{names.prefix}ImageProcessor", "processor_class": f"{names.prefix}Processor",
             "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": layout.longest_edge},
             "resample": _RESAMPLE_CODE[v.resize], "do_image_splitting": layout.tiles,
             "max_image_size": {"longest_edge": v.image_size}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std), "do_pad": True}
    processor = {"processor_class": f"{names.prefix}Processor", "image_seq_len": per_tile}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def writer(names: Names):
    """The `write` of one of the two model types."""

    def write(session: Session) -> Export:
        """The checkpoint as transformers 5 saves it: `model.vision_model.`, `model.connector.`,
        `model.text_model.`, `lm_head.`; the processor files of the split layout."""
        from vlmspec.compiler.schema.tile_layouts import Split

        vis, con, lm, fus = _parts(session, names)

        def fit(cond: bool, what: str) -> None:
            does_not_fit(cond, names.title, what, names.hint())

        layout = vis.config.layout
        fit(isinstance(layout, Split), f"vision `{vis.name}` without `layout = split(...)`")
        default = Split()
        fit(all(getattr(layout, k) == getattr(default, k) for k in ("around", "global_token", "tile_token")),
            f"`layout = {layout.to_vlm()}` (the processor's marker text is fixed)")
        c = con.config
        fit(list(con.sources) == [vis.name], f"connector `{con.name}` reading {list(con.sources)}")
        fit(c.out in (None, lm.config.width), f"connector `{con.name}` with out = {c.out}")
        refuse_unplaced(con, fit, _SHUFFLE, _SHUFFLE_FIXED)
        fit(fus.config.prefix_attention == "causal" and fus.config.image_token == "<image>",
            f"fusion `{fus.name}` with prefix_attention = {fus.config.prefix_attention}, image_token = "
            f"{fus.config.image_token!r}")
        for comp in (vis, con, lm):
            q = getattr(comp.config, "quantize", "none")
            fit(q == "none", f"`{comp.name}` with quantize = {q} (transformers would serve the unquantized weights)")
        grid = vis.config.image_size // vis.config.patch_size
        fit(grid % c.scale == 0, f"connector `{con.name}` scale {c.scale} that does not divide the {grid}-patch grid")
        per_tile = (grid // c.scale) ** 2
        text = _text_config(lm, session, names)
        config = {"model_type": names.model_type, "architectures": [f"{names.prefix}ForConditionalGeneration"],
                  "vision_config": _vision_config(vis, names), "text_config": text, "scale_factor": c.scale,
                  "image_token_id": int(session.model.image_token_id),
                  "tie_word_embeddings": lm.config.tie_embeddings}
        if "pad_token_id" in text:
            config["pad_token_id"] = text["pad_token_id"]
        return Export(config, {vis.name: _VISION, con.name: _PROJECTOR, lm.name: _LM},
                      _processor_files(vis, per_tile, names))

    return write


def _format(names: Names) -> VLMFormat:
    return VLMFormat(
        model_types=(names.model_type,),
        family=MultiFamily(names.model_type, {
            "vision": Part("vision", (_VISION,), kinds=frozenset({"siglip"})),
            "projector": Part("connector", (_PROJECTOR,), kinds=frozenset({"pixel_shuffle"})),
            "language": Part("language", (_LM,), sub_config="text_config"),
        }, {"vision": "vision", "connector": "projector", "language": "language"}),
        components={"siglip": "vision", "proj": "projector", "llm": "language"},
        read=read,
        # the two write the same tensors; an unnamed export is Idefics3's (`--format smolvlm` for SmolVLM's)
        claims=claims if names is IDEFICS3 else None,
        write=writer(names),
        hf_class=f"{names.prefix}ForConditionalGeneration",
        processor=f"`{names.prefix}Processor`: `{names.prefix}ImageProcessor` (longest-edge resize, tower-sized tiles "
                  "row by row then the global image; each tile's tokens after its `<row_r_col_c>` marker)",
        chat_template="kept (the spec's `chat_template`), or translated into `prompt` / `answer` / `system` where "
                      "exact; exported",
    )


FORMATS = (_format(IDEFICS3), _format(SMOLVLM))


"""CLIP (`CLIPModel`): a ViT image tower and a causal text tower, each pooled and projected (bias-free) into
one space, compared with a learned log-scale: `fusion contrastive(img + txt) { dim = ... loss = softmax }`.

The imported spec reads the image tower's pooled output (`feature = pooled`: the class token after the
post-LayerNorm), the text tower's end-of-text token (`pool = eos`, or `argmax` for the original checkpoints
whose config says eos_token_id = 2, as transformers does), and the head's projections and log-scale from the
checkpoint (`weights = "DIR#head"`). `temperature` is written as exp(-logit_scale), the checkpoint's value,
so that a spec built without weights starts where the checkpoint ended. CLIPImageProcessor resizes the
shortest edge and crops the centre (`fit = crop`).

SigLIP (`formats/siglip.py`) shares the readers here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec.runtime.weights.errors import EXPORT, weights_error
from vlmspec.runtime.weights.families import MultiFamily, Part, lay
from vlmspec.runtime.weights.formats.base import Export, VLMFormat, does_not_fit, refuse_unplaced
from vlmspec.runtime.weights.hf_folder import image_fields
from vlmspec.runtime.weights.spec_text import VISION_ACT, Raw, fields, need

if TYPE_CHECKING:
    from vlmspec.compiler.ir import Component, ModelIR
    from vlmspec.runtime.session import Session

#: transformers' text / vision config defaults, for keys a saved config leaves out
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "eos_token_id": 49407}
CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
#: vlmspec's activation -> transformers' name (the inverse of VISION_ACT on the names these towers use)
ACT_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
#: transformers' CLIPTextTransformer pools by argmax of the ids when the config says this (legacy) eos id
LEGACY_EOS = 2


def sub(config: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **(config.get(key) or {})}


def act_of(c: dict[str, Any], what: str) -> str:
    act = str(c["hidden_act"])
    need(act in VISION_ACT and VISION_ACT[act] in ACT_OUT, f"{what} activation {act}")
    return VISION_ACT[act]


def tower_fields(c: dict[str, Any], what: str) -> list[tuple[str, Any]]:
    return [("width", c["hidden_size"]), ("depth", c["num_hidden_layers"]), ("heads", c["num_attention_heads"]),
            ("mlp", c["intermediate_size"]), ("act", act_of(c, what)), ("norm_eps", float(c["layer_norm_eps"]))]


def vision_block(kind: str, vc: dict[str, Any], folder: str, extra: list[tuple[str, Any]]) -> str:
    pairs = [("image_size", vc["image_size"]), ("patch_size", vc["patch_size"]), *tower_fields(vc, "vision"),
             *extra, ("feature", Raw("pooled")), *image_fields(folder, vc["image_size"]), ("weights", f"{folder}#vision")]
    return f"  vision img = {kind} {{\n{fields(pairs)}\n  }}"


def text_block(kind: str, tc: dict[str, Any], folder: str, extra: list[tuple[str, Any]]) -> str:
    pairs = [*tower_fields(tc, "text"), ("vocab", tc["vocab_size"]), ("max_positions", tc["max_position_embeddings"]),
             *extra, ("weights", f"{folder}#text")]
    return f"  text txt = {kind} {{\n{fields(pairs)}\n  }}"


def checkpoint_scalar(folder: str, key: str) -> float | None:
    """A scalar the checkpoint learned (`logit_scale`, `logit_bias`), None when it holds none."""
    from vlmspec.runtime.weights.source import CheckpointSource

    source = CheckpointSource(Path(folder))
    return float(source.get(key).float().reshape(-1)[0]) if key in source else None


def head_block(pairs: list[tuple[str, Any]], folder: str) -> str:
    """The contrastive fusion; its learned tensors come from the checkpoint when the fusion kind can name a
    checkpoint (`weights`), as the projections need."""
    from vlmspec.compiler.schema.contrastive import Contrastive

    if "weights" in Contrastive.model_fields:
        pairs = [*pairs, ("weights", f"{folder}#head")]
    return f"  fusion contrastive(img + txt) {{\n{fields(pairs)}\n  }}"


def temperature(folder: str, config: dict[str, Any]) -> float:
    scale = checkpoint_scalar(folder, "logit_scale")
    if scale is None:
        scale = float(config.get("logit_scale_init_value", math.log(1 / 0.07)))
    need(scale >= 0, f"a logit_scale {scale} below 0 (a temperature above 1)")
    return math.exp(-scale)


def read(config: dict[str, Any], folder: str) -> tuple[list[str], int | None]:
    tc, vc = sub(config, "text_config", CLIP_TEXT), sub(config, "vision_config", CLIP_VISION)
    eos = int(tc["eos_token_id"])
    pool = [("pool", Raw("argmax"))] if eos == LEGACY_EOS else [("pool", Raw("eos")), ("eos_token_id", eos)]
    head = [("dim", int(config.get("projection_dim", 512))), ("loss", Raw("softmax")),
            ("temperature", temperature(folder, config))]
    return [vision_block("vit", vc, folder, []), text_block("clip_text", tc, folder, pool),
            head_block(head, folder)], None


def family(model_type: str, head: tuple[tuple[str, str], ...], vision_kind: str, text_kind: str) -> MultiFamily:
    return MultiFamily(model_type, {
        "vision": Part("vision", (lay(("vision_model.", "")),), kinds=frozenset({vision_kind})),
        "text": Part("text", (lay(("text_model.", "")),), kinds=frozenset({text_kind})),
        "head": Part("fusion", (lay(*head),), kinds=frozenset({"contrastive"})),
    }, {"vision": "vision", "text": "text", "fusion": "head"})


def towers(ir: ModelIR, vision_kind: str, text_kind: str) -> tuple[Component, Component, Component] | None:
    """(image tower, text tower, contrastive fusion) when the spec is exactly that, else None."""
    vision, text, fusion = ir.by_role("vision"), ir.by_role("text"), ir.by_role("fusion")
    if len(vision) != 1 or len(text) != 1 or len(fusion) != 1 or ir.by_role("connector") or ir.language is not None:
        return None
    if vision[0].kind != vision_kind or text[0].kind != text_kind or fusion[0].kind != "contrastive":
        return None
    return vision[0], text[0], fusion[0]


def claims(ir: ModelIR) -> bool:
    return towers(ir, "vit", "clip_text") is not None


# ------------------------------------------------------------------ export

_VISION = {"image_size", "patch_size", "width", "depth", "heads", "mlp", "act", "norm_eps", "feature", "mean", "std",
           "resize", "fit", "weights", "dtype"}
_TEXT = {"width", "depth", "heads", "mlp", "act", "norm_eps", "vocab", "max_positions", "weights", "tokenizer",
         "dtype"}


def vision_config(cfg: Any) -> dict[str, Any]:
    return {"hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.channels, "hidden_act": ACT_OUT[cfg.act], "layer_norm_eps": cfg.norm_eps}


def text_config(cfg: Any) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab, "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_positions, "hidden_act": ACT_OUT[cfg.act],
            "layer_norm_eps": cfg.norm_eps}


def image_processor(cfg: Any, processor: str, crop: bool) -> dict[str, Any]:
    from vlmspec.runtime.weights.formats.blip2 import RESAMPLE_CODE

    size = ({"shortest_edge": cfg.image_size} if crop else {"height": cfg.image_size, "width": cfg.image_size})
    out = {"image_processor_type": processor, "do_resize": True, "size": size,
           "resample": RESAMPLE_CODE[cfg.resize], "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": list(cfg.mean), "image_std": list(cfg.std),
           "do_center_crop": crop, "do_convert_rgb": True}
    if crop:
        out["crop_size"] = {"height": cfg.image_size, "width": cfg.image_size}
    return out


CLIP_HEAD = (("visual_projection.", "proj_image."), ("text_projection.", "proj_text."), ("logit_scale", "logit_scale"))


def layouts(vision: Component, text: Component, fusion: Component, head: tuple[tuple[str, str], ...]) -> dict:
    return {vision.name: lay(("vision_model.", "")), text.name: lay(("text_model.", "")), fusion.name: lay(*head)}


def write(session: Session) -> Export:
    """The `CLIPModel` folder of a CLIP-shaped spec, in the layout transformers saves."""
    ir = session.analysis.ir
    vision, text, fusion = exact_towers(ir, "clip", "vit", "clip_text")
    fit = _fit("clip")
    v, t, f = vision.config, text.config, fusion.config
    fit(v.feature.pooled and v.class_token and v.pre_norm and v.post_norm and not v.patch_bias,
        "an image tower that is not CLIP's (class token, pre- and post-LayerNorm, `feature = pooled`)")
    fit(v.fit in ("crop", "stretch"), f"vision `{vision.name}` with fit = {v.fit}")
    refuse_unplaced(vision, fit, _VISION)
    refuse_unplaced(text, fit, _TEXT | {"pool", "eos_token_id"})
    fit(f.dim is not None and f.loss == "softmax", "a contrastive fusion without `dim` or with the sigmoid loss "
        "(CLIP projects both towers and uses the softmax loss)")
    fit(t.pool == "argmax" or t.eos_token_id != LEGACY_EOS, f"text `{text.name}` pooling at end-of-text id "
        f"{LEGACY_EOS} (transformers reads eos_token_id = {LEGACY_EOS} as the original checkpoints' argmax pooling)")
    tc = text_config(t)
    tc["eos_token_id"] = LEGACY_EOS if t.pool == "argmax" else t.eos_token_id
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": f.dim,
              "logit_scale_init_value": f.initial_log_scale(), "text_config": tc, "vision_config": vision_config(v)}
    files = {"preprocessor_config.json": image_processor(v, "CLIPImageProcessor", v.fit == "crop")}
    return Export(config, layouts(vision, text, fusion, CLIP_HEAD), files)


def exact_towers(ir: ModelIR, fmt: str, vision_kind: str, text_kind: str) -> tuple[Component, Component, Component]:
    """The spec's (image tower, text tower, fusion), or E0586 when it is not exactly that shape."""
    found = towers(ir, vision_kind, text_kind)
    if found is None:
        raise weights_error(EXPORT, f"export-hf: a spec other than one `{vision_kind}` tower, one `{text_kind}` tower "
                            f"and a contrastive fusion does not fit the {fmt} layout",
                            help="export-hf writes a CLIP / SigLIP folder for exactly that shape")
    return found


def _fit(fmt: str):
    def fit(cond: bool, what: str) -> None:
        does_not_fit(cond, fmt, what, "export-hf writes a CLIP / SigLIP folder for a spec that is exactly the "
                     "imported shape: one tower of each and a contrastive fusion")
    return fit


FORMAT = VLMFormat(
    model_types=("clip",),
    family=family("clip", CLIP_HEAD, "vit", "clip_text"),
    components={"img": "vision", "txt": "text", "contrastive": "head"},
    read=read, claims=claims, write=write, hf_class="CLIPModel",
    processor="CLIPImageProcessor: shortest-edge resize, centre crop (`fit = crop`); captions: BOS, text, EOS",
    chat_template="none: a contrastive model has no prompts; the tokenizer is kept",
)

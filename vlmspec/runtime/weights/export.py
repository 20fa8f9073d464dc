"""`export_hf`: a vlmspec model folder with prefix fusion -> the Hugging Face LLaVA layout.

The folder is loadable by `LlavaForConditionalGeneration.from_pretrained(out_dir)` and, with the
model's tokenizer copied and an image-processor config written from the spec, by `LlavaProcessor`
too (so anything that serves LLaVA can serve it). Only what LLaVA can express is exported: one
CLIP-style `vit`, a 2-layer `mlp` connector, a `llama` language model and a `prefix` fusion; anything
else is E0586 naming what does not fit. The folder is written aside and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis
from vlmspec.fsutil import fsync_dir_files, replace_dir
from vlmspec.runtime.model import VisionLanguageModel
from vlmspec.runtime.session import load_session
from vlmspec.runtime.weights.errors import EXPORT, weights_error

_ACT_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
           "relu": "relu"}


def _fit(cond: bool, what: str) -> None:
    if not cond:
        raise weights_error(EXPORT, f"export_hf: {what} does not fit the LLaVA layout",
                            help="LLaVA is one CLIP-style `vit`, a 2-layer `mlp`, a `llama` and a `prefix` fusion")


def llava_config(model: VisionLanguageModel, analysis: Analysis) -> dict[str, Any]:
    """The `LlavaConfig` fields of a spec-built model (E0586 when it is not LLaVA-shaped)."""
    ir = analysis.ir
    by = {r: ir.by_role(r) for r in ("vision", "connector", "language", "fusion")}
    _fit(all(len(v) == 1 for v in by.values()), "a model with other than one encoder, connector, LM and fusion")
    vis, con, lm, fus = (by[r][0] for r in ("vision", "connector", "language", "fusion"))
    v, c, t = vis.config, con.config, lm.config
    _fit(vis.kind == "vit" and v.class_token and v.pre_norm and not v.patch_bias and v.position == "learned"
         and not v.feature_norm
         and v.resolution == "fixed" and not v.tiles and v.temporal_patch == 1, f"vision `{vis.name}` ({vis.kind})")
    _fit(con.kind == "mlp" and c.layers == 2 and not c.norm and (c.hidden is None or c.hidden == t.width)
         and list(con.sources) == [vis.name], f"connector `{con.name}` ({con.kind})")
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and t.rope == "default" and t.act == "silu",
         f"language model `{lm.name}` ({lm.kind})")
    _fit(fus.kind == "prefix", f"fusion `{fus.name}` ({fus.kind})")
    layers = list(v.feature.layers)
    tokens = analysis.shapes.out[fus.name].tokens
    text = {"model_type": "qwen2" if t.qkv_bias else "llama", "vocab_size": t.vocab, "hidden_size": t.width,
            "intermediate_size": t.ffn, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "num_key_value_heads": t.n_kv, "head_dim": t.hd, "max_position_embeddings": t.max_positions,
            "rms_norm_eps": t.norm_eps, "rope_theta": t.rope_theta, "tie_word_embeddings": t.tie_embeddings,
            "hidden_act": "silu"}
    if not t.qkv_bias:
        text.update(attention_bias=False, mlp_bias=False)
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
                          "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": v.channels, "hidden_act": v.act
                          if v.act == "quick_gelu" else _ACT_HF[v.act], "layer_norm_eps": v.norm_eps},
        "text_config": text,
        "image_token_index": int(model.image_token_id), "image_seq_length": tokens,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": "default" if v.feature.tokens == "patches" else "full",
        "projector_hidden_act": _ACT_HF[c.act], "multimodal_projector_bias": True,
        "tie_word_embeddings": t.tie_embeddings,
    }, (vis.name, con.name, lm.name)


# the files `save_pretrained` writes for a tokenizer (whichever of them the model folder has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as CLIPImageProcessor stores them


def processor_configs(model: VisionLanguageModel, analysis: Analysis) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (CLIPImageProcessor doing what the spec's image transform does: an
    exact resize to the encoder's size, rescale, normalise) and `processor_config.json` (LlavaProcessor)."""
    (vis,) = analysis.ir.by_role("vision")
    (fus,) = analysis.ir.by_role("fusion")
    v = vis.config
    image = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
             "do_resize": True, "size": {"height": v.image_size, "width": v.image_size},
             "resample": _RESAMPLE[v.resize], "do_center_crop": False, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std),
             "do_convert_rgb": True}
    processor = {"processor_class": "LlavaProcessor", "patch_size": v.patch_size,
                 "vision_feature_select_strategy": "default" if v.feature.tokens == "patches" else "full",
                 "num_additional_image_tokens": 1 if v.class_token else 0, "image_token": fus.config.image_token}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` in the LLaVA layout (config, weights, tokenizer, processor configs); return it."""
    from safetensors.torch import save_file

    session = load_session(model_dir)
    model = session.model
    config, (vis, con, lm) = llava_config(model, session.analysis)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    prefixes = {vis: "vision_tower.", con: "multi_modal_projector.", lm: "language_model."}
    tie = config["tie_word_embeddings"]
    for comp, prefix in prefixes.items():
        for k, t in model.components[comp].state_dict().items():
            if tie and comp == lm and k == "lm_head.weight":
                continue
            tensors[prefix + k] = t.detach().contiguous().cpu()
    dtype = next(iter(tensors.values())).dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    copied = [f for f in TOKENIZER_FILES if (Path(model_dir) / f).is_file()]
    for name in copied:
        shutil.copyfile(Path(model_dir) / name, tmp / name)
    if copied:
        for name, cfg in processor_configs(model, session.analysis).items():
            (tmp / name).write_text(json.dumps(cfg, indent=2))
    fsync_dir_files(tmp)
    replace_dir(tmp, out)
    return out

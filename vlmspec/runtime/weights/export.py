"""`export_hf`: a vlmspec model folder with prefix fusion -> the Hugging Face LLaVA layout.

The folder is loadable by `AutoModelForImageTextToText` / `LlavaForConditionalGeneration` and, with the
model's tokenizer copied and the processor configs written from the spec, by `AutoProcessor`; it also
holds `chat_template.jinja` (the spec's `chat_template` verbatim, else one written from its `prompt`,
`answer` and `system` that yields the ids vlmspec's `Processor` builds) and `generation_config.json`
(the spec's stop ids as `eos_token_id`, the image placeholder suppressed, greedy), so `transformers
serve` or any LLaVA server runs it without hand edits. Only what LLaVA can express is exported: one
CLIP-style `vit`, a 2-layer `mlp` connector, a `llama` language model and a causal `prefix` fusion,
unquantized; anything else is E0586 naming what does not fit. The folder is written aside and renamed
into place.
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
    _fit(v.attn_bias and not v.global_layers and not v.tile_padding,
         f"vision `{vis.name}` without attention biases or with global layers / tile padding")
    _fit(con.kind == "mlp" and c.layers == 2 and not c.norm and (c.hidden is None or c.hidden == t.width)
         and list(con.sources) == [vis.name], f"connector `{con.name}` ({con.kind})")
    _fit(lm.kind == "llama" and t.moe is None and not t.extra_vocab and t.rope == "default" and t.act == "silu",
         f"language model `{lm.name}` ({lm.kind})")
    _fit(not t.embed_extra, f"language model `{lm.name}` with embed_extra = {t.embed_extra}")
    _fit(fus.kind == "prefix", f"fusion `{fus.name}` ({fus.kind})")
    _fit(fus.config.prefix_attention == "causal", f"fusion `{fus.name}` with prefix_attention = "
         f"{fus.config.prefix_attention}")
    for comp in (vis, con, lm):
        q = getattr(comp.config, "quantize", "none")
        _fit(q == "none", f"`{comp.name}` with quantize = {q} (transformers would serve the unquantized weights)")
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


# the files `save_pretrained` writes for a tokenizer (whichever of them the model folder has); a chat
# template of the tokenizer's is not copied: the exported one says how vlmspec lays prompts out
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as CLIPImageProcessor stores them


def processor_configs(model: VisionLanguageModel, analysis: Analysis) -> dict[str, dict[str, Any]]:
    """`preprocessor_config.json` (the image processor doing what the spec's image transform does: for
    `fit = stretch` CLIPImageProcessor's exact resize to the encoder's size; for `crop` its shortest-edge
    resize and centre crop; for `pad` LlavaImageProcessor's square of the mean colour first; then rescale
    and normalise) and `processor_config.json` (LlavaProcessor)."""
    (vis,) = analysis.ir.by_role("vision")
    (fus,) = analysis.ir.by_role("fusion")
    v = vis.config
    s = v.image_size
    fit = getattr(v, "fit", "stretch")
    image = {"image_processor_type": "LlavaImageProcessor" if fit == "pad" else "CLIPImageProcessor",
             "processor_class": "LlavaProcessor", "do_resize": True,
             "size": {"height": s, "width": s} if fit == "stretch" else {"shortest_edge": s},
             "resample": _RESAMPLE[v.resize], "do_center_crop": fit != "stretch",
             "crop_size": {"height": s, "width": s}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.mean), "image_std": list(v.std),
             "do_convert_rgb": True}
    if fit == "pad":
        image["do_pad"] = True
    processor = {"processor_class": "LlavaProcessor", "patch_size": v.patch_size,
                 "vision_feature_select_strategy": "default" if v.feature.tokens == "patches" else "full",
                 "num_additional_image_tokens": 1 if v.class_token else 0, "image_token": fus.config.image_token}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


# A Jinja chat template that lays a conversation out as `Processor.encode_turns` does: bos, then per user
# message the spec's `system` + "\n" (a system message replaces it), then `prompt` with `{image}` -> one
# image token per image part (the HF processor expands each to the image's tokens) and `{q}` -> the text
# parts joined by "\n" (as `vlm serve` joins them); per assistant message `answer` with `{a}` -> its text,
# then eos unless it already ends with it. The prompt already ends where the answer starts, so the
# generation prompt adds nothing. Literals are JSON strings, which Jinja's string literals read alike.
_CHAT_TEMPLATE = """{#- written by `vlm export-hf` from the spec's prompt, answer and system settings -#}
{%- set prompt = PROMPT -%}
{%- set answer = ANSWER -%}
{%- set image_token = IMAGE -%}
{%- set ns = namespace(system=SYSTEM) -%}
{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set parts = [{'type': 'text', 'text': message['content']}] -%}
{%- else -%}
{%- set parts = message['content'] or [] -%}
{%- endif -%}
{%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = text -%}
{%- elif message['role'] == 'user' -%}
{%- set images = image_token * (parts | selectattr('type', 'equalto', 'image') | list | length) -%}
{%- if ns.system -%}{{ ns.system ~ '\\n' }}{%- endif -%}
{{- prompt | replace('{image}', images) | replace('{q}', text) -}}
{%- elif message['role'] == 'assistant' -%}
{%- set reply = answer | replace('{a}', text) -%}
{{- reply -}}
{%- if eos_token is defined and eos_token and not reply.endswith(eos_token) -%}{{ eos_token }}{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""


def chat_template(analysis: Analysis) -> str:
    """The spec's `chat_template` setting verbatim when it has one, else the template above filled in
    with its `prompt` (images first when it has no `{image}`), `answer`, `system` and image token."""
    settings = analysis.ir.settings
    own = getattr(settings, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    fusions = analysis.ir.by_role("fusion")
    image_token = fusions[0].config.image_token if fusions else "<image>"
    prompt = settings.prompt if "{image}" in settings.prompt else "{image}" + settings.prompt
    literal = {"PROMPT": prompt, "ANSWER": settings.answer, "IMAGE": image_token}
    system = json.dumps(settings.system, ensure_ascii=False) if settings.system else "none"
    text = _CHAT_TEMPLATE.replace("namespace(system=SYSTEM)", f"namespace(system={system})")
    for key, value in literal.items():
        text = text.replace(f"= {key} -", f"= {json.dumps(value, ensure_ascii=False)} -")
    return text


def generation_config(session: Any) -> dict[str, Any]:
    """`generation_config.json`: stop at the spec's stop ids (eos first), never emit the in-sequence image
    placeholder (as `model.generate` bans it), greedy, up to the language model's context."""
    tok, facts = session.tokenizer, session.facts
    stops = list(facts.stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else None)
    gen: dict[str, Any] = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                           "pad_token_id": pad, "do_sample": False}
    if facts.max_positions:
        gen["max_length"] = facts.max_positions
    if facts.banned_id is not None:
        gen["suppress_tokens"] = [int(facts.banned_id)]
    return {k: v for k, v in gen.items() if v is not None and v != []}


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` in the LLaVA layout (config, weights, tokenizer, processor configs, chat template,
    generation config); return it."""
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
    if copied and session.tokenizer is not None:
        configs = {**processor_configs(model, session.analysis), "generation_config.json": generation_config(session)}
        for name, cfg in configs.items():
            (tmp / name).write_text(json.dumps(cfg, indent=2))
        (tmp / "chat_template.jinja").write_text(chat_template(session.analysis))
    fsync_dir_files(tmp)
    replace_dir(tmp, out)
    return out

"""The spec library in `specs/`: every file checks, every full model has a `_tiny` twin, and the closed-form
parameter counts agree with the Hugging Face classes built on the meta device (nothing is allocated).

For each spec that has a transformers class, a converter below builds the class's config from the spec's
resolved IR, so the same converter serves the full-size model and its `_tiny` variant. Where the class
cannot express a detail of the spec (or the spec one of the class), `explained` gives the exact number of
parameters the two differ by, with the reason; a full-size model must also be within 0.5%.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmspec.compiler.compile import Analysis, check_file, load_analysis
from vlmspec.compiler.ir import ModelIR
from vlmspec.compiler.summary import summarise

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECS = Path(__file__).resolve().parent.parent / "specs"
SPEC_FILES = sorted(SPECS.glob("*.vlm"))
PUBLISHED = re.compile(r"Published parameter count: ~?\d+(\.\d+)?[BM]\b")


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------ the library checks


def test_library_is_complete():
    names = {p.name for p in SPEC_FILES}
    expected = {
        "llava-1.5-7b.vlm", "llava-1.5-13b.vlm", "blip2-opt-2.7b.vlm", "instructblip-vicuna-7b.vlm",
        "minigpt4-vicuna-7b.vlm", "idefics-9b.vlm", "llama-3.2-11b-vision.vlm", "qwen2-vl-2b.vlm", "qwen2.5-vl-7b.vlm",
        "cogvlm-17b.vlm", "moe-llava-phi2.vlm", "mobilevlm-1.7b.vlm", "paligemma-3b.vlm", "tinyllava-3.1b.vlm",
        "llava-v1.6-mistral-7b.vlm", "llava-onevision-qwen2-7b.vlm", "internvl2.5-8b.vlm",
        "minigpt-v2-7b.vlm", "idefics3-8b.vlm", "smolvlm-2.2b.vlm",
        "fuyu-8b.vlm", "pixtral-12b.vlm", "cobra-3b.vlm", "convllava-7b.vlm", "blip2-flan-t5-xl.vlm",
        "blip2-flan-t5-xxl.vlm", "deepseek-vl-7b.vlm", "kosmos-2.vlm",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_checks(path: Path):
    result = check_file(str(path))
    errors = [f"{d.span}: {d.code} {d.message}" for d in result.diagnostics if d.severity == "error"]
    assert result.ok, "\n".join(errors)
    by_name = {a.ir.name: a for a in result.analyses}
    full = [n for n in by_name if not n.endswith("_tiny")]
    assert full, f"{path.name} defines no full-size model"
    for name in full:
        tiny_name = f"{name}_tiny"
        assert tiny_name in by_name, f"{name} has no `{tiny_name}` variant"
        big, tiny = by_name[name].ir, by_name[tiny_name].ir
        assert tiny.lineage[1:2] == [name], f"{tiny_name} should extend {name}"
        # same components, roles, kinds and fusion style; same stage schedule
        assert {(c.name, c.role, c.kind) for c in tiny.components.values()} == \
            {(c.name, c.role, c.kind) for c in big.components.values()}
        assert [s.name for s in tiny.stages] == [s.name for s in big.stages]
        assert by_name[tiny_name].total_params < 1_000_000
        assert by_name[name].total_params > 100 * by_name[tiny_name].total_params
    assert PUBLISHED.search(_header(path)), f"{path.name}: the header names no published parameter count"


# ------------------------------------------------------------------ spec -> transformers config


def _one(ir: ModelIR, role: str, kind: str | None = None):
    comps = [c for c in ir.by_role(role) if kind is None or c.kind == kind]
    assert len(comps) == 1, f"expected one {role} {kind or ''} in {ir.name}"
    return comps[0].config


def _clip_vision(v) -> dict:
    assert v.kind == "vit" and v.class_token and v.pre_norm and v.post_norm and not v.patch_bias and not v.tiles
    return dict(model_type="clip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=v.channels)


def _siglip_vision(v, **extra) -> dict:
    assert v.kind == "siglip" and not v.class_token and not v.pre_norm and v.post_norm and v.patch_bias
    return dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=v.channels, vision_use_head=v.pool_head, **extra)


def _eva_vision(v) -> dict:
    assert v.kind == "eva" and v.class_token and not v.pre_norm and v.post_norm and v.patch_bias
    return dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, qkv_bias=True)


def _llama_text(lm, **extra) -> dict:
    assert lm.kind == "llama" and lm.moe is None and lm.extra_vocab == 0 and not lm.qkv_bias
    return dict(model_type="llama", vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                num_hidden_layers=lm.depth, num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv,
                head_dim=lm.hd, max_position_embeddings=lm.max_positions,
                tie_word_embeddings=lm.tie_embeddings, **extra)


def _text_config(lm) -> dict:
    if lm.kind == "llama" and lm.qkv_bias:  # Qwen2: Llama with biased q / k / v projections
        assert lm.moe is None and lm.extra_vocab == 0 and lm.rope == "default"
        return dict(model_type="qwen2", vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                    num_hidden_layers=lm.depth, num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv,
                    max_position_embeddings=lm.max_positions, tie_word_embeddings=lm.tie_embeddings)
    if lm.kind == "llama":
        return _llama_text(lm)
    if lm.kind == "opt":
        assert lm.extra_vocab == 0 and lm.tie_embeddings
        return dict(model_type="opt", vocab_size=lm.vocab, hidden_size=lm.width, ffn_dim=lm.ffn,
                    num_hidden_layers=lm.depth, num_attention_heads=lm.heads, word_embed_proj_dim=lm.e,
                    max_position_embeddings=lm.max_positions, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    if lm.kind == "phi":
        assert lm.extra_vocab == 0 and lm.moe is None and not lm.tie_embeddings
        return dict(model_type="phi", vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                    num_hidden_layers=lm.depth, num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv,
                    max_position_embeddings=lm.max_positions, partial_rotary_factor=lm.partial_rotary)
    if lm.kind == "gemma":
        assert lm.extra_vocab == 0 and lm.tie_embeddings
        return dict(model_type="gemma", vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                    num_hidden_layers=lm.depth, num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv,
                    head_dim=lm.hd, max_position_embeddings=lm.max_positions)
    if lm.kind == "t5":
        act = {"gelu_tanh": "gelu", "relu": "relu", "gelu": "gelu", "silu": "silu"}[lm.act]
        return dict(model_type="t5", vocab_size=lm.vocab, d_model=lm.width, d_kv=lm.head_dim, d_ff=lm.ffn,
                    num_layers=lm.depth, num_decoder_layers=lm.decoder_depth or lm.depth, num_heads=lm.heads,
                    relative_attention_num_buckets=lm.buckets, relative_attention_max_distance=lm.max_distance,
                    feed_forward_proj=("gated-" if lm.gated else "") + act, tie_word_embeddings=lm.tie_embeddings)
    raise AssertionError(f"no transformers text config for `{lm.kind}`")


def llava(ir: ModelIR):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "mlp"), _one(ir, "language")
    assert proj.layers == 2 and proj.hidden in (None, lm.width) and not proj.norm
    vision = _clip_vision(v) if v.kind == "vit" else _siglip_vision(v)
    layers = v.feature.layers
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(lm), image_token_id=lm.vocab - 1,
                      vision_feature_layer=layers[0] if len(layers) == 1 else layers,
                      vision_feature_select_strategy="default" if v.class_token else "full")
    return LlavaForConditionalGeneration, cfg


def llava_next(ir: ModelIR):
    """LLaVA-NeXT: LLaVA's parts plus `image_newline` (the connector's, in the text width), the encoder's
    anyres pinpoints as `image_grid_pinpoints`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "mlp"), _one(ir, "language")
    assert proj.layers == 2 and proj.hidden in (None, lm.width) and not proj.norm and v.layout.newline
    layers = v.feature.layers
    cfg = LlavaNextConfig(vision_config=_clip_vision(v), text_config=_text_config(lm), image_token_id=lm.vocab - 1,
                          vision_feature_layer=layers[0] if len(layers) == 1 else layers,
                          vision_feature_select_strategy="default", image_grid_pinpoints=v.layout.pinpoints)
    return LlavaNextForConditionalGeneration, cfg


def llava_onevision(ir: ModelIR):
    """LLaVA-OneVision: LLaVA-NeXT's parts on a SigLIP tower (read in full: it has no class token), the
    layout's `max_tiles` as `vision_aspect_ratio`."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "mlp"), _one(ir, "language")
    assert proj.layers == 2 and proj.hidden in (None, lm.width) and not proj.norm and v.layout.newline
    cfg = LlavaOnevisionConfig(vision_config=_siglip_vision(v), text_config=_text_config(lm),
                               image_token_id=lm.vocab - 1, vision_feature_layer=v.feature.layers[0],
                               vision_feature_select_strategy="full", image_grid_pinpoints=v.layout.pinpoints,
                               vision_aspect_ratio=f"anyres_max_{v.layout.max_tiles}",
                               tie_word_embeddings=lm.tie_embeddings)
    return LlavaOnevisionForConditionalGeneration, cfg


def internvl(ir: ModelIR):
    """InternVL: an InternViT (layer scale, class token dropped) into a pixel shuffle + LayerNorm + 2-layer
    MLP projector into a Llama / Qwen2 text model."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "pixel_shuffle"), _one(ir, "language")
    assert v.kind == "internvit" and v.layer_scale and proj.norm and proj.layers == 2 and proj.bias
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
                  attention_bias=v.attn_bias, use_qk_norm=v.qk_norm, use_mean_pooling=not v.post_norm,
                  norm_type="rms_norm" if v.norm == "rms" else "layer_norm")
    cfg = InternVLConfig(vision_config=vision, text_config=_text_config(lm), image_token_id=lm.vocab - 1,
                         downsample_ratio=1 / proj.scale, vision_feature_layer=v.feature.layers[0],
                         tie_word_embeddings=lm.tie_embeddings)
    return InternVLForConditionalGeneration, cfg


def _qformer(qf, v) -> dict:
    return dict(hidden_size=qf.width, num_hidden_layers=qf.depth, num_attention_heads=qf.heads,
                intermediate_size=qf.mlp, cross_attention_frequency=qf.cross_every, encoder_hidden_size=v.width)


def blip2(ir: ModelIR):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    v, qf, lm = _one(ir, "vision"), _one(ir, "connector", "qformer"), _one(ir, "language")
    assert qf.project and not qf.instruction
    cfg = Blip2Config(vision_config=_eva_vision(v),
                      qformer_config=dict(_qformer(qf, v), use_qformer_text_input=qf.text_ffn),
                      text_config=_text_config(lm), num_query_tokens=qf.queries, image_token_id=lm.vocab - 1)
    return Blip2ForConditionalGeneration, cfg


def blip2_t5(ir: ModelIR):
    """BLIP-2 with a T5 text model, its head untied as Flan-T5's checkpoint holds it: transformers 5.23 ties a
    T5 head built from a config whatever `tie_word_embeddings` says (it unties only when loading a checkpoint
    with a head of its own)."""
    import torch

    cls, cfg = blip2(ir)
    untied = not _one(ir, "language").tie_embeddings

    class Untied(cls):
        def __init__(self, config):
            super().__init__(config)
            if untied:
                head = self.language_model.lm_head
                head.weight = torch.nn.Parameter(torch.empty_like(head.weight))

    Untied.__name__ = cls.__name__
    return Untied, cfg


def blip2_first_stage(a: Analysis) -> int:
    """The first-stage text side a `pretrain = true` Q-Former adds: embeddings and ITC / ITM heads as
    transformers' `Blip2ForImageTextRetrieval` has them, plus LAVIS's temperature and ITG prediction head."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    qf = _one(a.ir, "connector", "qformer")
    if not qf.pretrain:
        return 0
    v = _one(a.ir, "vision")
    cfg = Blip2Config(vision_config=_eva_vision(v), num_query_tokens=qf.queries, image_text_hidden_size=qf.embed_dim,
                      qformer_config=dict(_qformer(qf, v), vocab_size=qf.text_vocab, max_position_embeddings=qf.max_text))
    import torch

    with torch.device("meta"):
        ref = Blip2ForImageTextRetrieval(cfg)
    heads = sum(p.numel() for m in (ref.embeddings, ref.vision_projection, ref.text_projection, ref.itm_head)
                for p in m.parameters())
    w = qf.width
    return heads + 1 + (w * w + w) + 2 * w + qf.text_vocab  # temp, ITG transform + LayerNorm, output bias


def instructblip(ir: ModelIR):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    v, qf, lm = _one(ir, "vision"), _one(ir, "connector", "qformer"), _one(ir, "language")
    assert qf.project and qf.instruction and qf.text_ffn
    qformer = dict(_qformer(qf, v), vocab_size=qf.text_vocab, max_position_embeddings=qf.max_text)
    cfg = InstructBlipConfig(vision_config=_eva_vision(v), qformer_config=qformer, text_config=_text_config(lm),
                             num_query_tokens=qf.queries, image_token_id=lm.vocab - 1)
    return InstructBlipForConditionalGeneration, cfg


def idefics(ir: ModelIR):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    v, rs, lm = _one(ir, "vision"), _one(ir, "connector", "perceiver"), _one(ir, "language")
    xa = _one(ir, "fusion", "cross_attention")
    assert v.kind == "vit" and v.pre_norm and v.post_norm and not v.patch_bias and v.feature.tokens == "all"
    assert rs.mlp_ratio == 4 and not rs.project  # IDEFICS' resampler MLP is 4 x the vision width
    assert lm.kind == "llama" and lm.n_kv == lm.heads and not lm.tie_embeddings
    assert xa.layers is None and xa.offset == 0 and xa.mlp and xa.gate == "tanh"
    assert lm.depth % xa.every == 0  # IDEFICS builds depth // interval blocks, at layers 0, N, 2N, ...
    cfg = IdeficsConfig(
        vocab_size=lm.vocab, additional_vocab_size=lm.extra_vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
        num_hidden_layers=lm.depth, num_attention_heads=lm.heads, max_position_embeddings=lm.max_positions,
        cross_layer_interval=xa.every, qk_layer_norms=xa.qk_norm, alpha_type="float", use_resampler=True,
        vision_config=dict(embed_dim=v.width, image_size=v.image_size, patch_size=v.patch_size,
                           intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
                           num_channels=v.channels),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=rs.latents, resampler_depth=rs.depth,
                              resampler_n_heads=rs.heads, resampler_head_dim=rs.head_dim,
                              qk_layer_norms_perceiver=rs.qk_norm))
    return IdeficsForVisionText2Text, cfg


def mllama(ir: ModelIR):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "linear"), _one(ir, "language")
    xa = _one(ir, "fusion", "cross_attention")
    assert v.kind == "vit" and v.tiles >= 1 and v.global_layers >= 1 and v.feature.layers[0] == v.depth
    assert not v.attn_bias and proj.bias and lm.embed_extra == 8
    assert xa.layers is not None and xa.qk_norm and xa.mlp and xa.gate == "tanh"
    assert xa.image_attention == "latest_group" and xa.no_image == "attend_all"
    ratios = [[w, h] for w in range(1, v.tiles + 1) for h in range(1, v.tiles // w + 1)]
    # Mllama counts intermediate layer outputs from 0, the spec hidden states from the embeddings
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth - v.global_layers,
                  num_global_layers=v.global_layers, attention_heads=v.heads, image_size=v.image_size,
                  patch_size=v.patch_size, num_channels=v.channels, max_num_tiles=v.tiles,
                  supported_aspect_ratios=ratios, intermediate_layers_indices=[i - 1 for i in v.feature.layers[1:]],
                  vision_output_dim=v.width * len(v.feature.layers))
    # a cross-attention block before self-attention layer j is layer j + (blocks before it) in Mllama's numbering
    cross = [j + k for k, j in enumerate(sorted(xa.layers))]
    text = dict(vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                num_hidden_layers=lm.depth + len(cross), num_attention_heads=lm.heads,
                num_key_value_heads=lm.n_kv, cross_attention_layers=cross, max_position_embeddings=lm.max_positions,
                rope_parameters=dict(rope_type="default", rope_theta=lm.rope_theta),
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return MllamaForConditionalGeneration, MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=ir.settings.image_token_id)


def qwen2_vl(ir: ModelIR):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v, mg, lm = _one(ir, "vision"), _one(ir, "connector", "patch_merger"), _one(ir, "language")
    assert v.position == "rope2d" and not v.class_token and not v.pre_norm and not v.post_norm
    assert not v.patch_bias and v.mlp_dim % v.width == 0
    assert mg.layers == 2 and mg.hidden in (None, v.width * mg.merge**2) and mg.norm
    assert lm.kind == "llama" and lm.qkv_bias and not isinstance(lm.rope, str)
    text = dict(vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn, num_hidden_layers=lm.depth,
                num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv, max_position_embeddings=lm.max_positions,
                tie_word_embeddings=lm.tie_embeddings,
                rope_parameters=dict(rope_type="default", rope_theta=lm.rope_theta,
                                     mrope_section=list(lm.rope.sections)),
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(depth=v.depth, embed_dim=v.width, hidden_size=lm.width, mlp_ratio=v.mlp_dim // v.width,
                  num_heads=v.heads, in_channels=v.channels, patch_size=v.patch_size,
                  spatial_merge_size=mg.merge, temporal_patch_size=v.temporal_patch)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=lm.tie_embeddings,
                        image_token_id=lm.vocab - 1, video_token_id=lm.vocab - 2,
                        vision_start_token_id=lm.vocab - 3, vision_end_token_id=lm.vocab - 4)
    return Qwen2VLForConditionalGeneration, cfg


def qwen2_5_vl(ir: ModelIR):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    v, mg, lm = _one(ir, "vision"), _one(ir, "connector", "patch_merger"), _one(ir, "language")
    assert v.position == "rope2d" and not v.class_token and not v.pre_norm and not v.post_norm
    assert not v.patch_bias and v.norm == "rms" and v.gated_mlp and v.act == "silu"
    assert mg.layers == 2 and mg.hidden in (None, v.width * mg.merge**2) and mg.norm == "rms"
    assert lm.kind == "llama" and lm.qkv_bias and not isinstance(lm.rope, str)
    text = dict(vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn, num_hidden_layers=lm.depth,
                num_attention_heads=lm.heads, num_key_value_heads=lm.n_kv, max_position_embeddings=lm.max_positions,
                tie_word_embeddings=lm.tie_embeddings,
                rope_parameters=dict(rope_type="default", rope_theta=lm.rope_theta,
                                     mrope_section=list(lm.rope.sections)),
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(depth=v.depth, hidden_size=v.width, out_hidden_size=lm.width, intermediate_size=v.mlp_dim,
                  num_heads=v.heads, in_channels=v.channels, patch_size=v.patch_size, hidden_act=v.act,
                  spatial_merge_size=mg.merge, temporal_patch_size=v.temporal_patch, window_size=v.window,
                  fullatt_block_indexes=list(v.full_layers))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=lm.tie_embeddings,
                           image_token_id=lm.vocab - 1, video_token_id=lm.vocab - 2,
                           vision_start_token_id=lm.vocab - 3, vision_end_token_id=lm.vocab - 4)
    return Qwen2_5_VLForConditionalGeneration, cfg


def paligemma(ir: ModelIR):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "linear"), _one(ir, "language")
    assert proj.bias and lm.kind == "gemma"
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(v, projection_dim=lm.width),
                          text_config=_text_config(lm), projection_dim=lm.width, image_token_id=lm.vocab - 1)
    return PaliGemmaForConditionalGeneration, cfg


def fuyu(ir: ModelIR):
    from transformers import FuyuConfig, FuyuForCausalLM

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "linear"), _one(ir, "language")
    assert v.kind == "patches" and proj.bias and lm.kind == "persimmon"
    text = dict(model_type="persimmon", vocab_size=lm.vocab, hidden_size=lm.width, intermediate_size=lm.ffn,
                num_hidden_layers=lm.depth, num_attention_heads=lm.heads, max_position_embeddings=lm.max_positions,
                qk_layernorm=lm.qk_norm, rope_parameters=dict(rope_type="default", rope_theta=lm.rope_theta,
                                                              partial_rotary_factor=lm.partial_rotary))
    cfg = FuyuConfig(text_config=text, patch_size=v.patch_size, num_channels=v.channels, image_token_id=lm.vocab - 1)
    return FuyuForCausalLM, cfg


def deepseek_vl_hybrid(ir: ModelIR):
    """DeepSeek-VL: a `sam` (with DeepSeek-VL's down-sampler and second neck) and a `siglip` into a `hybrid`
    aligner; transformers ties the head by the top-level flag, so it is carried there."""
    from transformers import DeepseekVLHybridConfig, DeepseekVLHybridForConditionalGeneration

    sam, v, lm = _one(ir, "vision", "sam"), _one(ir, "vision", "siglip"), _one(ir, "language")
    _one(ir, "connector", "hybrid")
    assert sam.downsample == v.image_size // v.patch_size and sam.global_neck == sam.global_layers[0]
    high = dict(model_type="sam_vision_model", hidden_size=sam.width, output_channels=sam.neck,
                num_hidden_layers=sam.depth, num_attention_heads=sam.heads, num_channels=sam.channels,
                image_size=sam.image_size, patch_size=sam.patch_size, mlp_dim=sam.mlp_dim, qkv_bias=sam.attn_bias,
                use_abs_pos=sam.abs_pos, use_rel_pos=sam.rel_pos, window_size=sam.window_patches,
                global_attn_indexes=list(sam.global_layers))
    cfg = DeepseekVLHybridConfig(vision_config=_siglip_vision(v), high_res_vision_config=high,
                                 text_config=_llama_text(lm), tie_word_embeddings=lm.tie_embeddings,
                                 image_token_id=lm.vocab - 1)
    return DeepseekVLHybridForConditionalGeneration, cfg


def pixtral(ir: ModelIR):
    """Pixtral 12B as mistral-community/pixtral-12b holds it: LLaVA with a `pixtral` vision_config."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "mlp"), _one(ir, "language")
    assert v.kind == "pixtral" and proj.layers == 2 and proj.hidden in (None, lm.width) and not proj.norm
    vision = dict(model_type="pixtral", hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  num_channels=v.channels, hidden_act=v.act)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text(lm), image_token_id=lm.vocab - 1,
                      vision_feature_layer=v.feature.layers[0], vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration, cfg


def qwen2_audio(ir: ModelIR):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    enc, lm = _one(ir, "audio", "whisper"), _one(ir, "language")
    assert _one(ir, "connector", "linear").group == 1 and enc.pool == 2
    audio = dict(num_mel_bins=enc.mels, d_model=enc.width, encoder_layers=enc.depth,
                 encoder_attention_heads=enc.heads, encoder_ffn_dim=enc.mlp_dim, max_source_positions=enc.positions)
    return Qwen2AudioForConditionalGeneration, Qwen2AudioConfig(audio_config=audio, text_config=_text_config(lm))


def kosmos2(ir: ModelIR):
    """Kosmos-2: a CLIP tower read at its last layer, the latent-query projection, Kosmos-2's decoder."""
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "latent_queries"), _one(ir, "language", "kosmos2")
    assert proj.heads == lm.heads and lm.kind == "kosmos2"
    vision = {k: x for k, x in _clip_vision(v).items() if k != "model_type"}
    text = dict(vocab_size=lm.vocab, embed_dim=lm.width, layers=lm.depth, ffn_dim=lm.ffn, attention_heads=lm.heads,
                max_position_embeddings=lm.max_positions, tie_word_embeddings=lm.tie_embeddings)
    cfg = Kosmos2Config(vision_config=vision, text_config=text, latent_query_num=proj.latents,
                        tie_word_embeddings=lm.tie_embeddings)
    return Kosmos2ForConditionalGeneration, cfg


def phi_head_bias(a: Analysis) -> int:
    # LlavaForConditionalGeneration builds its own output head without a bias; Phi-2's head (PhiForCausalLM,
    # and TinyLLaVA's own checkpoint) has one, which the spec counts
    return _one(a.ir, "language").vocab


@dataclass(frozen=True)
class Parity:
    ref: str  # file.vlm:model
    build: Callable[[ModelIR], tuple[type, object]]
    explained: Callable[[Analysis], int] | None = None  # summary total minus the class's count, and why
    training_only: Callable[[Analysis], int] | None = None  # parameters only training uses (not in the class)


PARITY = [
    Parity("llava-1.5-7b.vlm:llava_1_5_7b", llava),
    Parity("llava-1.5-13b.vlm:llava_1_5_13b", llava),
    Parity("tinyllava-3.1b.vlm:tinyllava_3_1b", llava, phi_head_bias),
    Parity("llava-v1.6-mistral-7b.vlm:llava_v1_6_mistral_7b", llava_next),
    Parity("llava-onevision-qwen2-7b.vlm:llava_onevision_qwen2_7b", llava_onevision),
    Parity("internvl2.5-8b.vlm:internvl2_5_8b", internvl),
    Parity("blip2-opt-2.7b.vlm:blip2_opt_2_7b", blip2, training_only=blip2_first_stage),
    Parity("minigpt4-vicuna-7b.vlm:minigpt4_vicuna_7b", blip2),
    Parity("instructblip-vicuna-7b.vlm:instructblip_vicuna_7b", instructblip),
    Parity("idefics-9b.vlm:idefics_9b", idefics),
    Parity("llama-3.2-11b-vision.vlm:llama_3_2_11b_vision", mllama),
    Parity("qwen2-vl-2b.vlm:qwen2_vl_2b", qwen2_vl),
    Parity("qwen2.5-vl-7b.vlm:qwen2_5_vl_7b", qwen2_5_vl),
    Parity("paligemma-3b.vlm:paligemma_3b", paligemma),
    Parity("fuyu-8b.vlm:fuyu_8b", fuyu),
    Parity("blip2-flan-t5-xl.vlm:blip2_flan_t5_xl", blip2_t5, training_only=blip2_first_stage),
    Parity("blip2-flan-t5-xxl.vlm:blip2_flan_t5_xxl", blip2_t5, training_only=blip2_first_stage),
    Parity("pixtral-12b.vlm:pixtral_12b", pixtral),
    Parity("deepseek-vl-7b.vlm:deepseek_vl_7b", deepseek_vl_hybrid),
    Parity("qwen2-audio-7b.vlm:qwen2_audio_7b", qwen2_audio),
    Parity("kosmos-2.vlm:kosmos_2", kosmos2),
]
CASES = [(p, tiny) for p in PARITY for tiny in (False, True)]


def _meta_count(cls: type, cfg: object) -> int:
    import torch

    with torch.device("meta"):
        model = cls(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("case", "tiny"), CASES,
                         ids=[p.ref.split(":")[1] + ("_tiny" if tiny else "") for p, tiny in CASES])
def test_params_match_transformers(case: Parity, tiny: bool):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    file, model = case.ref.split(":")
    analysis = load_analysis(f"{SPECS / file}:{model}{'_tiny' if tiny else ''}")[0]
    ours = summarise(analysis)["params"]["total"]
    cls, cfg = case.build(analysis.ir)
    theirs = _meta_count(cls, cfg)
    extra = case.training_only(analysis) if case.training_only else 0
    expected = (case.explained(analysis) if case.explained else 0) + extra
    assert ours - theirs == expected, f"{analysis.ir.name}: summary {ours:,} vs {cls.__name__} {theirs:,}"
    if not tiny:
        assert abs(ours - extra - theirs) <= 0.005 * theirs

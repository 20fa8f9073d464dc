"""Specs of models that no transformers class holds whole (Cobra): each component's parameter count equals
the transformers class of that part, built on the meta device from the spec's own fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmspec.compiler.compile import load_analysis
from vlmspec.compiler.summary import summarise

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _meta_count(cls: type, cfg: object) -> int:
    import torch

    with torch.device("meta"):
        model = cls(cfg)
    return sum(p.numel() for p in model.parameters())


def _dinov2(c):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
        hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.heads, mlp_ratio=c.mlp // c.width,
        image_size=c.position_size or c.image_size, patch_size=c.patch_size, num_register_tokens=c.registers)


def _siglip(c):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel, SiglipVisionConfig(
        hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.heads, intermediate_size=c.mlp,
        image_size=c.image_size, patch_size=c.patch_size, vision_use_head=c.pool_head)


def _mamba(c):
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM, MambaConfig(
        vocab_size=c.vocab, hidden_size=c.width, num_hidden_layers=c.depth, state_size=c.state, conv_kernel=c.conv,
        expand=c.expand, time_step_rank=c.rank, tie_word_embeddings=c.tie_embeddings, use_conv_bias=c.conv_bias,
        use_bias=c.bias)


PARTS = {"dinov2": _dinov2, "siglip": _siglip, "mamba": _mamba}


@pytest.mark.parametrize("ref", ["cobra-3b.vlm:cobra_3b", "cobra-3b.vlm:cobra_3b_tiny"])
def test_each_part_matches_its_transformers_class(ref: str) -> None:
    pytest.importorskip("transformers")
    file, model = ref.split(":")
    analysis = load_analysis(f"{SPECS / file}:{model}")[0]
    counts = summarise(analysis)["params"]["by_component"]
    checked = 0
    for name, comp in analysis.ir.components.items():
        build = PARTS.get(comp.kind)
        if build is None:
            continue
        cls, cfg = build(comp.config)
        assert counts[name] == _meta_count(cls, cfg), f"{name}: summary {counts[name]:,} vs {cls.__name__}"
        checked += 1
    assert checked == 3

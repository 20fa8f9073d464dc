"""What --fsdp can and cannot shard: a trained fusion whose blocks run inside the language model's layers
(called from hooks, never through a forward FSDP2 could gather around) is refused in one typed line before any
process group or mesh is touched; the processes of a torchrun then stop together with the same error."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.model import build_model
from vlmspec.runtime.spec_paths import ParamTable
from vlmspec.runtime.train.distribution import Dist, wrap

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_fsdp_refuses_a_trained_cross_attention_fusion() -> None:
    analysis, _ = load_analysis(f"{SPECS / 'idefics-9b.vlm'}:idefics_9b_tiny")
    model = build_model(analysis)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("components.cross_attention."))
    with pytest.raises(UserInputError) as e:
        wrap(model, Dist(rank=0, world=2), True, ParamTable.of(model, analysis))
    d = e.value.diagnostics[0]
    assert d.code == "E0529" and "`cross_attention`" in d.message and "without --fsdp" in (d.help or "")

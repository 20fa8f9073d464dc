"""One answer to "what does this spec path cover": the compiler's closed-form counts (used by `vlm check`,
`vlm summary` and the stage plans, without torch) equal the parameters the built modules declare under
the same path (used by freezing, learning rates, LoRA and FSDP), for every path of every case."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_helpers import CASES, analyse

from vlmspec.compiler.compile import load_analysis
from vlmspec.compiler.passes import part_params, valid_paths
from vlmspec.runtime.model import build_model
from vlmspec.runtime.spec_paths import ParamTable

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = sorted(f"{p}:{p.stem.replace('-', '_').replace('.', '_')}_tiny" for p in (ROOT / "specs").glob("*.vlm"))


def _check(analysis) -> None:
    model = build_model(analysis, device="meta")
    table = ParamTable.of(model, analysis)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    paths = [p for p in valid_paths(analysis.ir) if p != "fusion"]
    assert paths
    for path in paths:
        declared = sum(sizes[n] for n in table.covered(path))
        assert declared == part_params(analysis.ir, analysis.shapes, path), path


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_case_paths_agree(tmp_path, case) -> None:
    _check(analyse(tmp_path, CASES[case].text()))


@pytest.mark.parametrize("ref", LIBRARY, ids=[r.split(":")[1] for r in LIBRARY])
def test_library_paths_agree(ref) -> None:
    _check(load_analysis(ref)[0])


def test_lora_targets_are_declared_linears(tmp_path) -> None:
    """Every LoRA target a kind allows names a linear layer of the built component, where the part exists."""
    for case in CASES.values():
        analysis = analyse(tmp_path, case.text())
        model = build_model(analysis, device="meta")
        table = ParamTable.of(model, analysis)
        for comp in analysis.ir.components.values():
            for target in comp.config.lora_targets():
                part = f"{comp.name}.{target.split('.')[0]}"
                if part_params(analysis.ir, analysis.shapes, part):  # (an MoE-only LM has no dense `mlp`)
                    assert table.lora_modules(comp.name, [target]), f"{comp.name}.{target}"

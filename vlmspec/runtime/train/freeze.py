"""Trainable or frozen, by graph path: `apply_stage(model, analysis, "align")` sets `requires_grad`.

What each path covers comes from the parameter table the modules declare (`vlmspec.runtime.spec_paths`);
of the paths a stage decides that cover a parameter, the most specific one wins, which is how the
compiler counts trainable parameters. Paths are matched by the module that owns the parameter, never
by a name suffix anywhere in the model (LLaVA #1647).
"""

from __future__ import annotations

from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.runtime.spec_paths import ParamTable, stage_decisions

__all__ = ["apply_stage", "stage_decisions", "trainable_count"]


def apply_stage(model: nn.Module, analysis: Analysis, stage_name: str,
                table: ParamTable | None = None) -> dict[str, bool]:
    """Set `requires_grad` on every parameter as stage `stage_name` says; returns name -> trainable.

    LoRA-adapted components are frozen here (their adapters are added by the trainer, not by this helper).
    A parameter tied to another (a tied output head) follows the first name it is reached by.
    """
    decisions = stage_decisions(analysis, stage_name)
    table = table or ParamTable.of(model, analysis)
    fixed = fixed_parameters(model)
    result: dict[str, bool] = {}
    for name, p in model.named_parameters():
        trainable = table.decide(name, decisions) == "train" and name not in fixed
        p.requires_grad_(trainable)
        result[name] = trainable
    return result


def fixed_parameters(model: nn.Module) -> set[str]:
    """Parameters the spec itself holds fixed, whatever a stage trains: a module says which of its own by a
    `fixed_parameters()` method (a contrastive head with `learn_temperature = false`: its scale and bias)."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        own = getattr(module, "fixed_parameters", None)
        if callable(own) and module is not model:
            out.update(f"{prefix}.{leaf}" if prefix else leaf for leaf in own())
    return out


def trainable_count(model: nn.Module) -> int:
    """Unique parameters that will get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

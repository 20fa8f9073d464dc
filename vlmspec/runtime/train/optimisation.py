"""Parameter groups, optimizers and learning-rate schedules, as a stage declares them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.stage import Stage
from vlmspec.runtime.spec_paths import ParamTable, stage_rates


def param_groups(model: torch.nn.Module, stage: Stage, analysis: Analysis, table: ParamTable) -> list[dict[str, Any]]:
    """One group per learning rate: a parameter takes the rate of the most specific path that sets one
    (`train llm, llm.attn(lr = 1e-5)`: the attention at 1e-5, the rest of `llm` at the optimizer's)."""
    rates = stage_rates(analysis, stage.name)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = table.rate(name, rates)
            groups.setdefault(stage.optim.lr if lr is None else lr, []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def make_optimizer(groups: list[dict[str, Any]], stage: Stage) -> torch.optim.Optimizer:
    o = stage.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def lr_lambda(stage: Stage, total: int) -> Callable[[int], float]:
    warm = int(round(stage.warmup * total))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if stage.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if stage.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f

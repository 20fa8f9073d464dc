"""LoRA by graph path, through `peft`.

`lora llm(rank = 16, targets = [attn.q, attn.v])` wraps exactly the q and v projections under the
component `llm` and nothing else: the pattern is anchored at `components.llm.`, so an adapter can
never land in the vision tower because a module name happens to end in `q_proj` (LLaVA #1647).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.passes import default_lora_targets
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error

#: Spec target -> module-name endings that implement it, across the families' (HF-compatible) layouts.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "attn.q": ("self_attn.q_proj", "self_attn.qkv"),
    "attn.k": ("self_attn.k_proj", "self_attn.qkv"),
    "attn.v": ("self_attn.v_proj", "self_attn.qkv"),
    "attn.o": ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "self_attn.projection"),
    "mlp.gate": ("mlp.gate_proj",),
    "mlp.up": ("mlp.up_proj",),
    "mlp.down": ("mlp.down_proj",),
    "mlp.fc1": ("mlp.fc1", "fc1"),
    "mlp.fc2": ("mlp.fc2", "fc2"),
}


def lora_pattern(component: str, targets: list[str]) -> str:
    endings = sorted({e for t in targets for e in TARGET_MODULES.get(t, ())})
    return rf"components\.{re.escape(component)}\..*\.({'|'.join(re.escape(e) for e in endings)})"


def inject_lora(model: nn.Module, analysis: Analysis, stage: Stage) -> list[nn.Module]:
    """Wrap the stage's LoRA targets in place; returns the wrapped modules."""
    from peft import LoraConfig, inject_adapter_in_model

    wrapped: list[nn.Module] = []
    for spec in stage.lora:
        comp = spec.path.split(".")[0]
        names = [comp] if comp != "fusion" else [c.name for c in analysis.ir.by_role("fusion")]
        for name in names:
            cfg = analysis.ir.components[name].config
            targets = spec.targets or default_lora_targets(cfg)
            pattern = lora_pattern(name, targets)
            matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
            if not matched:
                raise user_error("E0533", f"stage `{stage.name}`: LoRA targets {targets} match no linear layer in `{name}`")
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=pattern)
            inject_adapter_in_model(config, model, adapter_name=f"lora_{name}")
            modules = dict(model.named_modules())
            wrapped.extend(modules[n] for n in matched)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and remove the wrappers; returns how many."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            count += 1
    return count


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]

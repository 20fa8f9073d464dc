"""LoRA by graph path, through `peft`.

`lora llm(rank = 16, targets = [attn.q, attn.v])` wraps exactly the q and v projections the component
`llm` declares and nothing else, so an adapter can never land in the vision tower because a module
name happens to end in `q_proj` (LLaVA #1647).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.passes import default_lora_targets
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.runtime.quantize import quiet_torchao
from vlmspec.runtime.spec_paths import ParamTable, expand_fusion


def inject_lora(model: nn.Module, analysis: Analysis, stage: Stage, table: ParamTable | None = None) -> list[nn.Module]:
    """Wrap the stage's LoRA targets in place; returns the wrapped modules.

    The linear layers a target names are the ones the component declares (`lora_parts()`, read through
    the parameter table), passed to peft by their full names: nothing is matched by a name suffix."""
    quiet_torchao()  # peft imports torchao when it is installed
    from peft import LoraConfig, inject_adapter_in_model

    table = table or ParamTable.of(model, analysis)
    wrapped: list[nn.Module] = []
    for spec in stage.lora:
        for name in expand_fusion(spec.path, analysis):
            cfg = analysis.ir.components[name].config
            targets = spec.targets or default_lora_targets(cfg)
            matched = table.lora_modules(name, targets)
            if not matched:
                raise user_error("E0533", f"stage `{stage.name}`: LoRA targets {targets} match no linear layer in `{name}`")
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=matched)
            # peft keeps a record of injected adapters on the model and warns when it finds one: each
            # component's adapters are injected on their own, and the record serves nothing here
            if "peft_config" in vars(model):
                del model.peft_config
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
    # peft's record of the injected adapters: gone with them, so a later stage's LoRA starts afresh (else peft
    # warns of several adapters on one model)
    if count and "peft_config" in vars(model):
        del model.peft_config
    return count


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]

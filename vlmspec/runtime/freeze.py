"""Trainable or frozen, by graph path: `apply_stage(model, analysis, "align")` sets `requires_grad`.

A stage names paths (`proj`, `llm`, `llm.moe`, `fusion`); each parameter belongs to its component and
to the sub-paths it lies under. Of the paths a stage decides that cover a parameter, the most
specific one wins, which is how the compiler counts trainable parameters. Paths are matched by
the parameter's place in the module tree, never by a name suffix anywhere in the model (LLaVA #1647).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import did_you_mean, user_error
from vlmspec.runtime.model import VisionLanguageModel

# How specific a path is: a component < `layers` / `embeddings` < a part of every layer < `moe`.
# A MoE fusion claims its layers' dense FFNs (its expert 0) above the language model as a whole.
_RANK_COMPONENT, _RANK_CLAIM, _RANK_GROUP, _RANK_PART, _RANK_MOE = 0, 1, 2, 3, 4

_LAYER = r"(?:model\.(?:decoder\.)?)?layers\.(\d+)\."
_LANGUAGE_PARTS: dict[str, tuple[int, str]] = {
    "embed": (_RANK_GROUP, r"model\.(?:decoder\.)?(?:embed_tokens|embed_positions|project_in|project_out)\."),
    "layers": (_RANK_GROUP, _LAYER),
    "attn": (_RANK_PART, _LAYER + r"self_attn\."),
    "mlp": (_RANK_PART, _LAYER + r"(?:mlp|fc1|fc2)\."),
    "norm": (_RANK_PART, r"model\.(?:decoder\.)?(?:norm|final_layernorm|final_layer_norm)\."),
    "head": (_RANK_PART, r"lm_head\."),
    "moe": (_RANK_MOE, _LAYER + r"moe\."),
}
_VISION_PARTS: dict[str, tuple[int, str]] = {
    "embeddings": (_RANK_GROUP, r"embeddings\."),
    "layers": (_RANK_GROUP, r"encoder\.layers\."),
    "attn": (_RANK_PART, r"encoder\.layers\.\d+\.self_attn\."),
    "mlp": (_RANK_PART, r"encoder\.layers\.\d+\.mlp\."),
    "norm": (_RANK_PART, r"(?:pre_layrnorm|post_layernorm)\."),
}
_CONNECTOR_PARTS: dict[str, tuple[int, str]] = {
    "queries": (_RANK_PART, r"query_tokens$"),
    "latents": (_RANK_PART, r"latents$"),
    "layers": (_RANK_GROUP, r"(?:qformer\.encoder|blocks)\."),
    "proj": (_RANK_PART, r"(?:language_projection|proj)\."),
    "pretrain": (_RANK_PART, r"(?:embeddings\.|vision_projection\.|text_projection\.|itm_head\.|itg_head\.|temp$)"),
}


@dataclass(frozen=True, slots=True)
class Claim:
    path: str
    rank: int


def parameter_paths(model: VisionLanguageModel, analysis: Analysis) -> dict[str, list[Claim]]:
    """Every parameter's full name -> the graph paths it lies under (with their specificity)."""
    out: dict[str, list[Claim]] = {}
    ir = analysis.ir
    moe_layers = _moe_dense_layers(model, analysis)
    for comp_name, module in model.components.items():
        comp = ir.components[comp_name]
        parts = {"language": _LANGUAGE_PARTS, "vision": _VISION_PARTS, "connector": _CONNECTOR_PARTS}.get(comp.role, {})
        allowed = set(comp.config.subpaths())
        for pname, _ in module.named_parameters():
            claims = [Claim(comp_name, _RANK_COMPONENT)]
            for sub, (rank, pattern) in parts.items():
                if sub in allowed and re.match(pattern, pname):
                    claims.append(Claim(f"{comp_name}.{sub}", rank))
            if comp.role == "language":
                m = re.match(_LAYER + r"(?:mlp|fc1|fc2)\.", pname)
                if m is not None:
                    layer = int(m.group(1))
                    if comp.config.moe is not None and layer in moe_layers.get(comp_name, set()):
                        claims.append(Claim(f"{comp_name}.moe", _RANK_MOE))  # the dense FFN is expert 0
                    for fusion, layers in moe_layers.items():
                        if fusion != comp_name and layer in layers:
                            claims.append(Claim(fusion, _RANK_CLAIM))
            out[f"components.{comp_name}.{pname}"] = claims
    return out


def _moe_dense_layers(model: VisionLanguageModel, analysis: Analysis) -> dict[str, set[int]]:
    """Owner (the language model for its own `moe`, or a MoE fusion) -> layers whose dense FFN is expert 0."""
    ir = analysis.ir
    lm = ir.language
    out: dict[str, set[int]] = {}
    if lm is None:
        return out
    depth = lm.config.depth
    moe = lm.config.moe
    if moe is not None and (moe.ffn is None or moe.ffn == lm.config.ffn):
        out[lm.name] = set(moe.layer_ids(depth))
    for f in ir.by_role("fusion"):
        if f.kind == "moe":
            out[f.name] = set(f.config.layer_ids(depth))
    return out


def stage_decisions(analysis: Analysis, stage_name: str) -> dict[str, str]:
    """path -> "train" | "freeze" | "lora" for one stage, with `fusion` expanded to the fusion components."""
    stages = {s.name: s for s in analysis.ir.stages}
    stage = stages.get(stage_name)
    if stage is None:
        raise user_error("E0518", f"model `{analysis.ir.name}` has no stage `{stage_name}`",
                         help=did_you_mean(stage_name, stages) or "stages: " + ", ".join(stages))
    fusions = [c.name for c in analysis.ir.by_role("fusion")]
    decisions: dict[str, str] = {}
    items = [(t.path, "train") for t in stage.train] + [(p, "freeze") for p in stage.freeze] + \
        [(lo.path, "lora") for lo in stage.lora]
    for path, action in items:
        head, _, rest = path.partition(".")
        if head == "fusion" and "fusion" not in analysis.ir.components:
            for f in fusions:
                decisions[f"{f}.{rest}" if rest else f] = action
        else:
            decisions[path] = action
    return decisions


def apply_stage(model: VisionLanguageModel, analysis: Analysis, stage_name: str) -> dict[str, bool]:
    """Set `requires_grad` on every parameter as stage `stage_name` says; returns name -> trainable.

    LoRA-adapted components are frozen here (their adapters are added by the trainer, not by this helper).
    A parameter tied to another (a tied output head) follows the first name it is reached by.
    """
    decisions = stage_decisions(analysis, stage_name)
    plan = next(p for p in analysis.plans if p.name == stage_name)
    paths = parameter_paths(model, analysis)
    params = dict(model.named_parameters())
    result: dict[str, bool] = {}
    for name, p in params.items():
        claims = [c for c in paths.get(name, []) if c.path in decisions]
        if not claims:
            comp = name.split(".")[1]
            trainable = plan.status.get(comp) in ("trained",)
        else:
            best = max(claims, key=lambda c: (c.rank, decisions[c.path] == "train"))
            trainable = decisions[best.path] == "train"
        p.requires_grad_(trainable)
        result[name] = trainable
    return result


def trainable_count(model: nn.Module) -> int:
    """Unique parameters that will get gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

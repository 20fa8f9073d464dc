"""Which spec path every parameter belongs to: one table, declared by the modules that own the parameters.

A stage names paths (`proj`, `llm`, `llm.attn`, `fusion`), and several jobs must agree on what a path
covers: freezing, learning-rate groups, LoRA targets, what a stage writes out, and FSDP wrapping. Each
component module declares its own sub-paths (`spec_parts()`: the submodules that make up `attn`,
`layers`, `queries`, ...) and the linear layers LoRA may wrap (`lora_parts()`); a fusion that takes over
weights of the language model (MoE's expert 0 is the layer's dense FFN) claims them (`claims(model)`),
as torchtune's fusion modules declare `fusion_params`. `ParamTable` turns those declarations into one
lookup, built once per model, and every job reads it instead of matching names.

Of the paths a stage decides that cover a parameter, the most specific one wins: a component <
a fusion's claim < a group of layers (`layers`, `embed`) < a part of every layer (`attn`, `mlp`, `norm`)
< the experts (`moe`). The compiler's closed-form counts of the same paths (`ComponentBase.part_params`)
are checked against this table for every library spec (tests/runtime/test_spec_paths.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import did_you_mean, user_error

COMPONENT, CLAIM, GROUP, PART, EXPERTS = 0, 1, 2, 3, 4

Member = nn.Module | nn.Parameter | None


@dataclass(frozen=True, slots=True)
class SpecPart:
    """`members` (modules or parameters of the declaring component) make up sub-path `path`."""

    path: str
    members: Sequence[Member]
    rank: int = PART


@dataclass(frozen=True, slots=True)
class Claim:
    path: str  # full spec path: `llm`, `llm.attn`, or a fusion's name for the weights it claims
    rank: int


@dataclass(slots=True)
class ParamTable:
    """Full parameter name (`components.llm.model.layers.0.self_attn.q_proj.weight`) -> the paths it lies under."""

    claims: dict[str, list[Claim]] = field(default_factory=dict)
    lora: dict[str, list[str]] = field(default_factory=dict)  # `llm.attn.q` -> full names of the linear layers
    component_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, analysis: Analysis) -> ParamTable:
        table = cls()
        # a tied parameter (an output head sharing the embedding) belongs where it is first reached, as in
        # `named_parameters()` and in the compiler's counts
        param_names = {id(p): [name] for name, p in model.named_parameters()}
        module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        comps = model.components  # type: ignore[attr-defined]
        for full in (n for names in param_names.values() for n in names):
            comp_name = full.split(".")[1]
            table.claims[full] = [Claim(comp_name, COMPONENT)]
            table.component_of[full] = comp_name
        for comp_name, module in comps.items():
            allowed = set(analysis.ir.components[comp_name].config.subpaths())
            parts = getattr(module, "spec_parts", None)
            for part in parts() if parts is not None else ():
                if part.path not in allowed:
                    continue
                for full in _names(part.members, param_names, module_names):
                    table.claims[full].append(Claim(f"{comp_name}.{part.path}", part.rank))
            claims = getattr(module, "claims", None)
            for part in claims(model) if claims is not None else ():
                for full in _names(part.members, param_names, module_names):
                    table.claims[full].append(Claim(comp_name, CLAIM))
            lora = getattr(module, "lora_parts", None)
            for target, linears in (lora() if lora is not None else {}).items():
                table.lora[f"{comp_name}.{target}"] = [module_names[id(m)] for m in linears if m is not None]
        return table

    def covered(self, path: str) -> list[str]:
        """Every parameter name under `path` (a component, a sub-path or a fusion's claim)."""
        return [n for n, cs in self.claims.items() if any(c.path == path for c in cs)]

    def decide(self, name: str, decisions: Mapping[str, str]) -> str | None:
        """The decision of the most specific decided path covering parameter `name` (None: none covers it).

        On equal specificity `train` wins, so a claim and its component never silently freeze each other."""
        best = None
        for c in self.claims.get(name, ()):
            if c.path in decisions:
                key = (c.rank, decisions[c.path] == "train")
                if best is None or key > best[0]:
                    best = (key, decisions[c.path])
        return best[1] if best is not None else None

    def rate(self, name: str, rates: Mapping[str, float]) -> float | None:
        """The learning rate of the most specific rated path covering parameter `name` (None: none does).
        Build the table after LoRA adapters are added, so that they lie under their layers' paths."""
        rated = [c for c in self.claims.get(name, ()) if c.path in rates]
        return rates[max(rated, key=lambda c: c.rank).path] if rated else None

    def components_with(self, names: Iterable[str]) -> set[str]:
        """The components the given parameters belong to."""
        return {self.component_of[n] for n in names if n in self.component_of}

    def lora_modules(self, component: str, targets: Iterable[str]) -> list[str]:
        """Full module names of the linear layers `targets` (`attn.q`, `mlp.down`) of `component`."""
        return sorted({n for t in targets for n in self.lora.get(f"{component}.{t}", ())})


def _names(members: Iterable[Member], param_names: Mapping[int, list[str]],
           module_names: Mapping[int, str]) -> list[str]:
    """The canonical names of the members' parameters (a module's tied alias of another module's
    parameter is not its own)."""
    canonical = {n for names in param_names.values() for n in names}
    out: list[str] = []
    for m in members:
        if m is None:
            continue
        if isinstance(m, nn.Parameter):
            out.extend(param_names.get(id(m), ()))
            continue
        prefix = module_names[id(m)]
        out.extend(n for n in (f"{prefix}.{r}" for r, _ in m.named_parameters(remove_duplicate=False))
                   if n in canonical)
    return list(dict.fromkeys(out))


def expand_fusion(path: str, analysis: Analysis) -> list[str]:
    """`fusion` (and `fusion.x`) names every fusion component; any other path names itself."""
    head, _, rest = path.partition(".")
    if head == "fusion" and "fusion" not in analysis.ir.components:
        return [f"{f.name}.{rest}" if rest else f.name for f in analysis.ir.by_role("fusion")]
    return [path]


def stage_decisions(analysis: Analysis, stage_name: str) -> dict[str, str]:
    """path -> "train" | "freeze" | "lora" for one stage, with `fusion` expanded to the fusion components."""
    stages = {s.name: s for s in analysis.ir.stages}
    stage = stages.get(stage_name)
    if stage is None:
        raise user_error("E0518", f"model `{analysis.ir.name}` has no stage `{stage_name}`",
                         help=did_you_mean(stage_name, stages) or "stages: " + ", ".join(stages))
    decisions: dict[str, str] = {}
    items = [(t.path, "train") for t in stage.train] + [(p, "freeze") for p in stage.freeze] + \
        [(lo.path, "lora") for lo in stage.lora]
    for path, action in items:
        for p in expand_fusion(path, analysis):
            decisions[p] = action
    return decisions


def stage_rates(analysis: Analysis, stage_name: str) -> dict[str, float]:
    """path -> learning rate for the paths a stage gives their own (`train llm.attn(lr = 1e-5)`)."""
    stage = next(s for s in analysis.ir.stages if s.name == stage_name)
    rates: dict[str, float] = {}
    for path, lr in [(t.path, t.lr) for t in stage.train] + [(lo.path, lo.lr) for lo in stage.lora]:
        if lr is not None:
            for p in expand_fusion(path, analysis):
                rates[p] = lr
    return rates

"""Fill spec components from Hugging Face checkpoints (`weights = "DIR"` or `"DIR#part"`).

Two entry points: `load_component_weights(model, analysis)` fills an already built model (its
parameters real or on the meta device), and `build_with_weights(analysis)` builds the model with
parameters on the meta device and assigns each checkpoint tensor, converted once into the
component's dtype, as the parameter itself: no random initialisation of weights that are about to be
overwritten, no fp32 copy of a bf16 model, so the peak stays near the checkpoint size. Components that
no `weights` names are newly initialised, and say so in the report.

Coverage is computed for every component before any tensor is read, so a bad checkpoint fails fast
and the error carries the full report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.passes import weights_location
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.blocks import init_weights
from vlmspec.runtime.model import build_model
from vlmspec.runtime.weights.agreement import check_agreement, expected_components
from vlmspec.runtime.weights.errors import COVERAGE, weights_error
from vlmspec.runtime.weights.families import Layout
from vlmspec.runtime.weights.report import ComponentCoverage, CoverageReport
from vlmspec.runtime.weights.resolution import multi_family, pick_layout, resolve
from vlmspec.runtime.weights.source import CheckpointSource, read_config


@dataclass(slots=True)
class _Plan:
    """One component's reading plan: canonical key -> checkpoint key, and its tied aliases."""

    coverage: ComponentCoverage
    source: CheckpointSource | None
    reads: dict[str, str]          # canonical component key -> checkpoint key
    aliases: dict[str, str]        # alias key -> canonical key
    alias_reads: dict[str, str]    # alias key -> checkpoint key, when the checkpoint stores the alias too
    layout: Layout | None = None


def _tensor_keys(module: nn.Module) -> tuple[list[str], dict[str, str]]:
    """State-dict keys of a module (canonical ones) and aliases of tied parameters -> their canonical key."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    keys = [k for k in module.state_dict(keep_vars=True) if k not in aliases]
    return keys, aliases


def _plan_component(name: str, module: nn.Module, source: CheckpointSource, layout: Layout | None,
                    cov: ComponentCoverage, allow_new: set[str]) -> _Plan:
    keys, aliases = _tensor_keys(module)
    own = module.state_dict(keep_vars=True)
    reads: dict[str, str] = {}
    consumed: set[str] = set()
    for k in keys:
        ck = layout.to_checkpoint(k) if layout is not None else None
        if ck is None or ck not in source:
            if _allowed(f"{name}.{k}", allow_new):
                cov.new.append(k)
            else:
                cov.missing.append(k)
            continue
        consumed.add(ck)
        theirs, ours = layout.shape(k, source.shape(ck)), tuple(own[k].shape)  # type: ignore[union-attr]
        if theirs != ours:
            cov.mismatched.append((k, ours, theirs))
            continue
        reads[k] = ck
        cov.loaded.append(k)
    alias_reads: dict[str, str] = {}
    for alias in aliases:
        ck = layout.to_checkpoint(alias) if layout is not None else None
        if ck is not None and ck in source and ck not in consumed:
            consumed.add(ck)
            alias_reads[alias] = ck
        cov.tied.append(alias)
    if layout is not None:
        cov.unexpected = sorted(k for k in source.keys() if layout.owns(k) and k not in consumed)
    return _Plan(cov, source, reads, aliases, alias_reads, layout)


def _allowed(path: str, allow_new: set[str]) -> bool:
    """Whether `component.key` is named by allow_new: the component, a module path in it, or the key."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in allow_new for i in range(1, len(parts) + 1))


def plan_weights(model: nn.Module, analysis: Analysis, *, allow_new: set[str] | frozenset[str] = frozenset(),
                 allow_pickle: bool = False) -> tuple[CoverageReport, dict[str, _Plan]]:
    """The coverage report (shapes only, no tensor read) and the reading plan of every component."""
    report = CoverageReport()
    plans: dict[str, _Plan] = {}
    sources: dict[Path, tuple[dict, CheckpointSource]] = {}
    expected: dict[Path, dict | UserInputError | None] = {}  # folder -> what its config says each part is
    allow = set(allow_new)
    for name, module in model.components.items():  # type: ignore[union-attr]
        comp = analysis.ir.components[name]
        value = getattr(comp.config, "weights", None)
        if value is None:
            cov = ComponentCoverage(name)
            cov.new = _tensor_keys(module)[0]
            report.components[name] = cov
            continue
        folder, part = weights_location(value, analysis.file)
        if folder not in sources:
            config = read_config(folder)
            sources[folder] = (config, CheckpointSource(folder, allow_pickle=allow_pickle))
        config, source = sources[folder]
        resolved = resolve(config, part, component=name, role=comp.role, kind=comp.kind, folder=str(folder))
        if folder not in expected:
            expected[folder] = expected_components(folder, config)
        said = expected[folder]
        if isinstance(said, UserInputError):  # the checkpoint computes what no spec of its kind can say
            report.disagreements.append(said)
        elif said:
            multi = multi_family(str(config.get("model_type", "")))
            key = (part or multi.default_part.get(comp.role)) if multi is not None else comp.role
            problem = check_agreement(name, comp, said.get(key), folder)
            if problem is not None:
                report.disagreements.append(problem)
        cov = ComponentCoverage(name, source=value, family=resolved.family)
        plans[name] = _plan_component(name, module, source, pick_layout(resolved, source.keys(), config), cov,
                                      allow)
        report.components[name] = cov
    return report, plans


def load_component_weights(model: nn.Module, analysis: Analysis, *,
                           allow_new: set[str] | frozenset[str] = frozenset(), strict: bool = True,
                           allow_pickle: bool = False, device: str | torch.device = "cpu") -> CoverageReport:
    """Load every component whose spec sets `weights`; return the coverage report.

    allow_new: component names, module paths (`enc.encoder.layers.2`) or `component.key` names that may be absent from their checkpoint and
    are initialised fresh instead (reported as `new`). strict=False reports problems without raising;
    keys it could not load keep their initialisation. Meta-device parameters are replaced by the loaded
    tensors (assigned, in the parameter's dtype); real ones are copied into.
    """
    report, plans = plan_weights(model, analysis, allow_new=allow_new, allow_pickle=allow_pickle)
    if strict and not report.ok:
        raise weights_error(COVERAGE, f"checkpoint does not fit the spec: {report.summary()}",
                            help="fix the spec to match the checkpoint, pass allow_new for parts that are "
                            "trained from scratch, or strict=False to load what fits", report=report)
    if strict and report.disagreements:  # the shapes fit, but the spec computes otherwise than the checkpoint
        raise report.disagreements[0]
    for name, plan in plans.items():
        module = model.components[name]  # type: ignore[index]
        untied = _load_plan(module, plan, device)
        plan.coverage.untied = untied
    for name, module in model.components.items():  # type: ignore[union-attr]
        if name not in plans:
            _materialize(module, device, init=True)
    if strict and not report.ok:  # a tie broken by the checkpoint is only seen once tensors are read
        raise weights_error(COVERAGE, f"checkpoint does not fit the spec: {report.summary()}", report=report)
    return report


def apply_spec_weights(model: nn.Module, analysis: Analysis) -> CoverageReport:
    """What `vlmspec.load` / `vlm build` call after building: strict, components without `weights` new."""
    return load_component_weights(model, analysis)


def build_with_weights(analysis: Analysis, *, image_token_id: int | None = None,
                       dtype: torch.dtype | str | None = None, allow_new: set[str] | frozenset[str] = frozenset(),
                       strict: bool = True, allow_pickle: bool = False,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, CoverageReport]:
    """Build the spec's model with parameters on the meta device, then load the spec's `weights`.

    Peak memory stays near the size of the loaded tensors in their final dtype; components without
    `weights` are allocated and initialised as `build_model` would (normal, std 0.02).
    """
    with params_on_meta():
        model = build_model(analysis, image_token_id=image_token_id, dtype=dtype)
    report = load_component_weights(model, analysis, allow_new=allow_new, strict=strict,
                                    allow_pickle=allow_pickle, device=device)
    for module in model.modules():  # non-persistent buffers were built on the CPU
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.device != torch.device(device):
                setattr(module, bname, buf.to(device))
    model.eval()
    return model, report


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers (rotary tables) stay real.

    Parameters are created (uninitialised, untouched memory) then moved to meta as they are registered,
    so initialisers that run afterwards cost nothing. Patches `nn.Module.register_parameter` for the
    duration, so build one model at a time per process.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _materialize(module: nn.Module, device: str | torch.device, init: bool) -> None:
    """Give meta parameters real (uninitialised) storage, keeping ties; then initialise the module."""
    done: dict[int, nn.Parameter] = {}
    touched = False
    for key, p in list(module.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta":
            continue
        owner, leaf = _owner(module, key)
        if id(p) not in done:
            done[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        setattr(owner, leaf, done[id(p)])
        touched = True
    if touched and init:
        init_weights(module)


def _load_plan(module: nn.Module, plan: _Plan, device: str | torch.device) -> list[str]:
    """Read the planned tensors into the module; return aliases whose checkpoint tensor breaks the tie."""
    source = plan.source
    if plan.coverage.new or plan.coverage.missing or plan.coverage.mismatched:
        _materialize(module, device, init=True)  # partial: start from a full initialisation, then overwrite
    own = module.state_dict(keep_vars=True)
    for key, ck in plan.reads.items():
        current = own[key]
        with torch.no_grad():
            tensor = source.get(ck, current.dtype)  # type: ignore[union-attr]
            if plan.layout is not None:
                tensor = plan.layout.convert(key, tensor)
            owner, leaf = _owner(module, key)
            if current.device.type == "meta":
                if isinstance(current, nn.Parameter):
                    setattr(owner, leaf, nn.Parameter(tensor.to(device), requires_grad=current.requires_grad))
                else:
                    setattr(owner, leaf, tensor.to(device))
            else:
                current.copy_(tensor)
    untied = []
    for alias, canon in plan.aliases.items():
        owner, leaf = _owner(module, alias)
        canon_owner, canon_leaf = _owner(module, canon)
        target = getattr(canon_owner, canon_leaf)
        setattr(owner, leaf, target)
        ck = plan.alias_reads.get(alias)
        if ck is not None and not torch.equal(source.get(ck, target.dtype), target.detach().cpu()):  # type: ignore[union-attr]
            untied.append(alias)
    return untied

"""The builder registry: (role, kind) -> a plain function that turns one IR component into a module.

One builder per component kind, registered next to the module it builds (one file per family), so
adding a kind to the schema and forgetting its runtime is caught by a test that compares this
registry with the schema's. This registry is the one piece of global mutable state in the runtime;
it is filled once, at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from vlmspec.compiler.schema.base import TokenShape
from vlmspec.diagnostics import DiagnosticSink, user_error

if TYPE_CHECKING:
    from vlmspec.compiler.compile import Analysis
    from vlmspec.compiler.ir import Component

#: Modules whose import registers builders (one per family; connectors register one file per kind).
_FAMILIES = ("vlmspec.runtime.vision", "vlmspec.runtime.audio", "vlmspec.runtime.connectors", "vlmspec.runtime.language",
             "vlmspec.runtime.fusion", "vlmspec.runtime.contrastive", "vlmspec.runtime.text")


@dataclass(slots=True)
class BuildContext:
    """What a builder may read besides its own component: the analysis (neighbour shapes) and the
    modules built before it (a fusion reads the language model it extends)."""

    analysis: Analysis
    built: dict[str, nn.Module] = field(default_factory=dict)

    def input_shape(self, name: str) -> TokenShape:
        """The merged shape of a component's sources, by the compiler's own merge rule."""
        comp = self.analysis.ir.components[name]
        ctx = self.analysis.shapes.contexts[name]
        quiet = dataclasses.replace(ctx, sink=DiagnosticSink())  # the analysis already reported any problem
        merged = getattr(comp.config, "merged_input", None)
        if merged is not None:
            return merged(quiet)
        ins = ctx.inputs
        if not ins:
            return TokenShape(0, 0)
        return TokenShape(sum(s.tokens for s in ins), ins[0].width, any(s.dynamic for s in ins))

    def source_shapes(self, name: str) -> list[TokenShape]:
        return list(self.analysis.shapes.contexts[name].inputs)

    def output_shape(self, name: str) -> TokenShape:
        return self.analysis.shapes.out[name]

    @property
    def language(self) -> Component:
        lm = self.analysis.ir.language
        if lm is None:
            raise user_error("E0592", f"model `{self.analysis.ir.name}` has no language model")
        return lm


Builder = Callable[["Component", BuildContext], nn.Module]

_BUILDERS: dict[tuple[str, str], Builder] = {}


def register(role: str, kind: str) -> Callable[[Builder], Builder]:
    """Decorator: `@register("connector", "mlp")` above the builder function."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS[(role, kind)] = fn
        return fn

    return deco


def load_builders() -> dict[tuple[str, str], Builder]:
    """Import every family module (which registers its builders) and return a copy of the registry."""
    for mod in _FAMILIES:
        importlib.import_module(mod)
    return dict(_BUILDERS)


def builder_for(role: str, kind: str) -> Builder:
    builders = load_builders()
    fn = builders.get((role, kind))
    if fn is None:
        kinds = sorted(k for r, k in builders if r == role)
        raise user_error("E0592", f"no runtime builder for {role} kind `{kind}`",
                         help="kinds with a builder: " + ", ".join(f"`{k}`" for k in kinds))
    return fn


def build_component(comp: Component, ctx: BuildContext) -> nn.Module:
    return builder_for(comp.role, comp.kind)(comp, ctx)

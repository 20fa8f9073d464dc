"""The typed IR: a model as resolved components, settings and stages. The input of every pass.

Spans are kept beside the IR (in `SpanTable`), not inside it, so two models can be compared for
equality regardless of where they were written (`parse(fmt(x))` has the same IR as `parse(x)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from vlmspec.compiler.schema import ComponentSchema, Settings, Stage
from vlmspec.compiler.schema.base import Role
from vlmspec.diagnostics import Span


class Component(BaseModel):
    """A named component with its role, kind, data flow and typed configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, defer_build=True)

    name: str
    role: Role
    kind: str
    sources: list[str] = []
    target: str | None = None
    config: SerializeAsAny[ComponentSchema]

    def field_values(self, resolved: bool = True) -> dict[str, Any]:
        """Every field of the configuration, derived defaults filled in when `resolved`."""
        cfg = self.config
        out = {}
        for name in type(cfg).model_fields:
            out[name] = resolved_value(cfg, name) if resolved else getattr(cfg, name)
        return out

    def explicit_fields(self) -> set[str]:
        return set(self.config.model_fields_set)


def resolved_value(cfg: ComponentSchema, name: str) -> Any:
    """A field's value with derived defaults (`mlp` = 4 x width, `kv_heads` = heads) filled in."""
    value = getattr(cfg, name)
    if value is not None:
        return value
    derived = {"mlp": "mlp_dim", "kv_heads": "n_kv", "head_dim": "hd"}.get(name)
    if derived and hasattr(cfg, derived):
        return getattr(cfg, derived)
    return value


class ModelIR(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str
    lineage: list[str]  # this model, then its bases, nearest first
    components: dict[str, Component]
    settings: Settings
    stages: list[Stage]

    def by_role(self, role: str) -> list[Component]:
        return [c for c in self.components.values() if c.role == role]

    @property
    def language(self) -> Component | None:
        lms = self.by_role("language")
        return lms[0] if lms else None


@dataclass(slots=True)
class SpanTable:
    """Where each piece of the IR was written: component headers, attributes, stages, statements."""

    components: dict[str, Span] = field(default_factory=dict)
    attrs: dict[tuple[str, str], Span] = field(default_factory=dict)
    flows: dict[tuple[str, str], Span] = field(default_factory=dict)  # (component, source or target name)
    stages: dict[str, Span] = field(default_factory=dict)
    stage_items: dict[tuple[str, str], Span] = field(default_factory=dict)  # (stage, "train:proj", "optim", ...)
    model: Span | None = None

    def attr(self, component: str, name: str) -> Span | None:
        return self.attrs.get((component, name)) or self.components.get(component)

"""Building blocks shared by every component schema: the kind registry, value types, shapes.

A component kind is one pydantic class, declared once: each field has its type, range, default and
a one-line description. That single declaration drives validation, `vlm show --resolved`, the JSON
Schema (`vlm schema`), the language reference and the `did you mean` hints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from vlmspec.diagnostics import DiagnosticSink, Span

Role = Literal["vision", "audio", "text", "connector", "language", "fusion"]
ROLES: tuple[Role, ...] = ("vision", "audio", "text", "connector", "language", "fusion")

Dtype = Literal["fp32", "bf16", "fp16"]
Quantize = Literal["none", "int8", "int4"]
BYTES_PER: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}

#: Upper bounds of the counts that passes loop over (layer lists, divisor hints, tile layouts): far above
#: any real model, low enough that a typo such as `depth = 320000000` is a quick E0202, not a hang.
MAX_LAYERS = 10_000
MAX_HEADS = 10_000
MAX_TILES = 256


@dataclass(frozen=True, slots=True)
class CallValue:
    """An evaluated call from the spec, such as `layer(-2).patches` or `adamw(lr = 2e-5)`.

    Schemas turn it into a typed value with a `mode="before"` validator; keeping the raw call until
    then lets a field decide what calls it accepts and say so in its error.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    attrs: tuple[str, ...] = ()

    def kw(self) -> dict[str, Any]:
        return dict(self.kwargs)


class Schema(BaseModel):
    """Base of every user-facing schema: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)


@dataclass(frozen=True, slots=True)
class TokenShape:
    """Visual tokens per image and their width. `tokens` is the maximum for dynamic resolution."""

    tokens: int
    width: int
    dynamic: bool = False
    #: an encoder's image layout (`anyres`, `dynamic_tiles`, `split`) as (layout, image_size, patch_size), for
    #: the connectors after it: `tokens` is then per tile at the encoder, the most per image after a connector
    layout: Any = None
    #: after a connector that reads a laid-out encoder: the tokens of one tile
    tile_tokens: int | None = None

    def __str__(self) -> str:
        return f"{'<=' if self.dynamic else ''}{self.tokens} x {self.width}"


@dataclass(slots=True)
class ShapeContext:
    """What a kind needs to know about its neighbours to infer its output and count its parameters."""

    name: str
    inputs: list[TokenShape]
    target_width: int | None  # width the consumer expects (LLM width for a connector into an LLM)
    sink: DiagnosticSink
    span_of: Callable[[str], Span | None]  # span of one of this component's attributes (or the header)
    llm_depth: int | None = None
    llm_heads: int | None = None
    llm_ffn: int | None = None
    #: each source's name and schema, in the order the spec lists them (a connector that pairs the grids of
    #: several encoders names them in its errors)
    sources: dict[str, Any] = field(default_factory=dict)


class ComponentSchema(Schema):
    """A component kind. Subclasses set `role` and `kind` and implement the hooks below."""

    role: ClassVar[Role]
    kind: ClassVar[str]
    summary: ClassVar[str] = ""
    #: whether the kind's module runs a stack of transformer blocks that `activation_checkpointing` can
    #: recompute (its run-time module declares `checkpoint_blocks`; tests hold the two to one answer)
    checkpointable: ClassVar[bool] = False

    def subpaths(self) -> list[str]:
        """Graph paths below this component that stages may freeze, train or LoRA-adapt."""
        return []

    def lora_targets(self) -> list[str]:
        """Linear layers (relative paths) that LoRA may wrap."""
        return []

    def part_params(self, sub: str, parts: dict[str, int], llm: Any = None) -> int:
        """Parameters under sub-path `sub` ("" for the whole component), from this kind's per-part counts
        (`params()`); `llm` is the language model's schema, for parts that reach into it. The run-time
        modules declare the same paths (`spec_parts()`); tests/runtime/test_spec_paths.py holds the two
        to one answer."""
        return sum(parts.values()) if not sub else parts.get(sub, 0)


@dataclass(slots=True)
class KindRegistry:
    """Component kinds by role and name. Built once when `vlmspec.compiler.schema` is imported."""

    by_role: dict[str, dict[str, type[ComponentSchema]]] = field(default_factory=dict)

    def register(self, cls: type[ComponentSchema]) -> type[ComponentSchema]:
        self.by_role.setdefault(cls.role, {})[cls.kind] = cls
        return cls

    def get(self, role: str, kind: str) -> type[ComponentSchema] | None:
        return self.by_role.get(role, {}).get(kind)

    def kinds(self, role: str) -> list[str]:
        return sorted(self.by_role.get(role, {}))


REGISTRY = KindRegistry()
register = REGISTRY.register


def fmt_value(v: Any) -> str:
    """A value as .vlm source text, for `show --resolved` and `diff`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        r = repr(v)
        return r if ("e" in r or "." in r) else r + ".0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v if v.isidentifier() and v not in {"true", "false"} else quote(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    to_vlm = getattr(v, "to_vlm", None)
    if to_vlm is not None:
        return to_vlm()
    if isinstance(v, BaseModel):
        inner = " ".join(f"{k} = {fmt_value(getattr(v, k))}" for k in type(v).model_fields)
        return "{ " + inner + " }"
    return str(v)


def quote(s: str) -> str:
    """A string as a .vlm literal (the inverse of the parser's unquoting)."""
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def layernorm(w: int, bias: bool = True) -> int:
    return w * (2 if bias else 1)

"""The syntax tree of a .vlm file. Every node keeps the span it came from, for diagnostics and `fmt`.

The AST is deliberately close to the text: it knows nothing of component kinds or defaults. The
resolver turns it into the typed IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlmspec.diagnostics import Span

# ---------------------------------------------------------------- values


@dataclass
class Int:
    value: int
    text: str
    span: Span


@dataclass
class Float:
    value: float
    text: str
    span: Span


@dataclass
class Str:
    value: str
    text: str
    span: Span


@dataclass
class Bool:
    value: bool
    span: Span


@dataclass
class ListVal:
    items: list[Value]
    span: Span


@dataclass
class Ref:
    """A bare identifier (`gelu`) or a dotted reference (`llm.width`)."""

    parts: list[str]
    span: Span

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass
class Arg:
    name: str | None
    value: Value
    span: Span


@dataclass
class Call:
    """`adamw(lr = 2e-5)` or `layer(-2).patches` (attrs holds the trailing `.patches`)."""

    name: str
    args: list[Arg]
    attrs: list[str]
    span: Span

    def kwargs(self) -> dict[str, Value]:
        return {a.name: a.value for a in self.args if a.name is not None}

    def positional(self) -> list[Value]:
        return [a.value for a in self.args if a.name is None]


@dataclass
class BinOp:
    op: Literal["+", "-", "*", "/"]
    left: Value
    right: Value
    span: Span


@dataclass
class Neg:
    operand: Value
    span: Span


Value = Int | Float | Str | Bool | ListVal | Ref | Call | BinOp | Neg

# ---------------------------------------------------------------- statements


@dataclass
class Attr:
    name: str
    value: Value
    span: Span
    name_span: Span


@dataclass
class Block:
    items: list[Attr | Override]
    span: Span
    close: Span  # the closing brace, so `fmt` can place comments written just before it


@dataclass
class Override:
    """`clip { depth = 2 }` at model level, or a nested block such as `moe { experts = 4 }`."""

    name: str
    block: Block
    span: Span
    name_span: Span


@dataclass
class Component:
    role: Literal["vision", "audio", "text", "connector", "language", "fusion"]
    name: str
    kind: str | None
    sources: list[tuple[str, Span]]
    target: tuple[str, Span] | None
    block: Block | None
    span: Span
    name_span: Span
    kind_span: Span | None
    header_end: Span  # where the header line ends (the `{` or the last token)


@dataclass
class Path:
    parts: list[str]
    span: Span

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass
class Target:
    path: Path
    args: list[Arg] | None
    span: Span


@dataclass
class TargetsStmt:
    keyword: Literal["train", "freeze", "lora"]
    targets: list[Target]
    span: Span


@dataclass
class ValueStmt:
    keyword: Literal["optim", "data", "batch", "epochs", "steps", "precision", "objective"]
    value: Value
    span: Span


@dataclass
class UpcycleStmt:
    source: Path
    dest: Path
    span: Span


StageItem = TargetsStmt | ValueStmt | UpcycleStmt | Attr


@dataclass
class Stage:
    name: str
    extends: tuple[str, Span] | None
    items: list[StageItem]
    span: Span
    name_span: Span
    open: Span
    close: Span


ModelItem = Component | Stage | Attr | Override


@dataclass
class Model:
    name: str
    extends: tuple[str, Span] | None
    items: list[ModelItem]
    span: Span
    name_span: Span
    open: Span
    close: Span


@dataclass
class Import:
    path: str
    span: Span


@dataclass
class Comment:
    text: str
    span: Span


@dataclass
class File:
    path: str
    source: str
    items: list[Import | Model]
    comments: list[Comment] = field(default_factory=list)

    @property
    def models(self) -> list[Model]:
        return [i for i in self.items if isinstance(i, Model)]

    @property
    def imports(self) -> list[Import]:
        return [i for i in self.items if isinstance(i, Import)]

"""What the schema says about a field, in words an editor can show: type, range, default, description.

The schema classes (one pydantic class per kind, `compiler/schema/`) are the single declaration of
every attribute; hover and completion read them here instead of keeping a second table that would
drift. Annotations are turned into the language's own words: `Literal["silu", "gelu"]` is "one of
`silu`, `gelu`", `int | None` is "int or `none`", a nested schema is "a `{ ... }` block".
"""

from __future__ import annotations

import types as pytypes
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmspec.compiler.schema import REGISTRY, Settings, Stage, fmt_value
from vlmspec.compiler.schema.base import ComponentSchema
from vlmspec.compiler.schema.stage import STAGE_ATTRS, Optim

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))

#: Stage statements (written `keyword VALUE`, not `name = value`) and what each one does.
STAGE_STATEMENTS: dict[str, str] = {
    "train": "parts that this stage trains, e.g. `train proj, llm.attn(lr = 1e-5)`",
    "freeze": "parts that this stage keeps frozen, e.g. `freeze clip, llm`",
    "lora": "parts adapted with LoRA, e.g. `lora llm(rank = 16, targets = [attn.q, attn.v])`",
    "optim": "the optimizer, e.g. `optim adamw(lr = 2e-5)`",
    "data": 'training data: `data "train.json"`, `data llava("train.json", images = "imgs/")`',
    "batch": "global batch size per optimizer step",
    "epochs": "passes over the data",
    "steps": "optimizer steps (overrides epochs)",
    "precision": "autocast precision: fp32, bf16 or fp16",
    "objective": "loss terms: lm, itc, itm, itg, combined with `+`",
    "upcycle": "initialise experts from the dense FFN: `upcycle llm.mlp -> llm.moe`",
}


@dataclass(frozen=True, slots=True)
class FieldDoc:
    name: str
    description: str
    type: str
    range: str
    default: str | None
    choices: tuple[str, ...]


def _args(ann: Any) -> tuple[Any, ...]:
    return typing.get_args(ann) if isinstance(ann, pytypes.UnionType) or typing.get_origin(ann) is typing.Union \
        else (ann,)


def literals(ann: Any) -> list[str]:
    """The values a field's `Literal[...]` parts allow, in declaration order (also inside unions)."""
    out: list[str] = []
    for a in _args(ann):
        if typing.get_origin(a) is Literal:
            out.extend(str(v) for v in typing.get_args(a))
    return out


def nested_schema(ann: Any) -> type[BaseModel] | None:
    """The schema class of a field written as a nested block (`moe { experts = 4 }`), if it is one."""
    for a in _args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel) and not hasattr(a, "to_vlm"):
            return a
    return None


def type_text(ann: Any) -> str:
    parts = []
    for a in _args(ann):
        if a is type(None):
            parts.append("`none`")
        elif typing.get_origin(a) is Literal:
            parts.append("one of " + ", ".join(f"`{v}`" for v in typing.get_args(a)))
        elif isinstance(a, type) and issubclass(a, BaseModel):
            doc = (a.__doc__ or a.__name__).strip().splitlines()[0]
            parts.append("a `{ ... }` block" if not hasattr(a, "to_vlm") else doc)
        elif typing.get_origin(a) is list:
            (inner,) = typing.get_args(a) or (Any,)
            parts.append(f"a list of {getattr(inner, '__name__', str(inner))}")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    return " or ".join(parts)


def range_text(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for attr, sym in _BOUNDS:
            v = getattr(meta, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
        lo, hi = getattr(meta, "min_length", None), getattr(meta, "max_length", None)
        if lo is not None:
            out.append(f"at least {lo} items")
        if hi is not None:
            out.append(f"at most {hi} items")
    return ", ".join(out)


def default_text(info: FieldInfo) -> str | None:
    if info.default_factory is not None:
        try:
            return fmt_value(info.default_factory())  # type: ignore[call-arg]
        except TypeError:
            return None
    if info.is_required():
        return None
    return fmt_value(info.default)


def field_doc(cls: type[BaseModel], name: str) -> FieldDoc | None:
    info = cls.model_fields.get(name)
    if info is None:
        return None
    return FieldDoc(name, info.description or "", type_text(info.annotation), range_text(info), default_text(info),
                    tuple(literals(info.annotation)))


def schema_for(owner: tuple[str, ...], kind_of: dict[str, tuple[str, str]]) -> type[BaseModel] | None:
    """The schema class of the block an attribute sits in: a component kind (and nested blocks within
    it), the stage block, or the model's settings. `kind_of` maps component names to (role, kind)."""
    if not owner:
        return None
    if owner[0] == "settings":
        return Settings
    if owner[0] == "stage":
        return Stage
    if owner[0] != "component" or len(owner) < 2 or owner[1] not in kind_of:
        return None
    cls: type[BaseModel] | None = REGISTRY.get(*kind_of[owner[1]])
    for part in owner[2:]:
        info = cls.model_fields.get(part) if cls is not None else None
        cls = nested_schema(info.annotation) if info is not None else None
    return cls


def attribute_names(cls: type[BaseModel]) -> list[str]:
    """The names a user writes `name = value` for in a block of this schema."""
    if cls is Stage:
        return list(STAGE_ATTRS)
    return list(cls.model_fields)


def kind_summary(cls: type[ComponentSchema]) -> str:
    return (cls.__doc__ or cls.summary or "").strip().splitlines()[0] if (cls.__doc__ or cls.summary) else ""


def optimizers() -> list[str]:
    return literals(Optim.model_fields["name"].annotation)


def markdown(doc: FieldDoc, where: str, value: str | None = None) -> str:
    """A field's documentation as hover / completion markdown."""
    lines = [f"**`{doc.name}`** ({where})" + (f": {doc.description}" if doc.description else "")]
    facts = [f"type: {doc.type}"]
    if doc.range:
        facts.append(f"range: {doc.range}")
    if doc.default is not None:
        facts.append(f"default: `{doc.default}`")
    if value is not None:
        facts.append(f"here: `{value}`")
    lines.append(" · ".join(facts))
    return "\n\n".join(lines)

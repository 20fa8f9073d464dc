"""Typed schemas for every component kind, the stage schedule and model settings.

Importing this package registers every kind in `REGISTRY`.
"""

from vlmspec.compiler.schema import (  # noqa: F401  (registration)
    audio,
    connectors,
    contrastive,
    convnext,
    dinov2,
    fusion,
    hybrid,
    kosmos2,
    language,
    mamba,
    patches,
    persimmon,
    pixtral,
    sam,
    t5,
    text_encoders,
    vision,
)
from vlmspec.compiler.schema.base import REGISTRY, ROLES, CallValue, ComponentSchema, TokenShape, fmt_value
from vlmspec.compiler.schema.stage import Settings, Stage

__all__ = ["REGISTRY", "ROLES", "CallValue", "ComponentSchema", "Settings", "Stage", "TokenShape", "fmt_value"]

"""Typed schemas for every component kind, the stage schedule and model settings.

Importing this package registers every kind in `REGISTRY`.
"""

from vlmspec.compiler.schema import connectors, fusion, language, vision  # noqa: F401  (registration)
from vlmspec.compiler.schema.base import REGISTRY, ROLES, CallValue, ComponentSchema, TokenShape, fmt_value
from vlmspec.compiler.schema.stage import Settings, Stage

__all__ = ["REGISTRY", "ROLES", "CallValue", "ComponentSchema", "Settings", "Stage", "TokenShape", "fmt_value"]

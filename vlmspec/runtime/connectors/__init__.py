"""Connectors, one file per kind; importing this package registers every connector builder."""

from vlmspec.runtime.connectors import (  # noqa: F401  (registration)
    c_abstractor,
    conv,
    hybrid,
    latent_queries,
    ldp,
    linear,
    mlp,
    patch_merger,
    perceiver,
    pixel_shuffle,
    pixtral_merger,  # noqa: F401  (registration: Mistral 3's projector)
    qformer,
)
from vlmspec.runtime.connectors.base import Connector, Instruction, merge_sources

__all__ = ["Connector", "Instruction", "merge_sources"]

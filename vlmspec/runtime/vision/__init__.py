"""Vision encoders, one file per kind; importing this package registers every vision builder."""

from vlmspec.runtime.vision import (  # noqa: F401  (registration; `patches`: Fuyu's raw patches)
    convnext,
    dinov2,
    eva,
    internvit,
    patches,
    pixtral,
    sam,
    siglip,
    vit,
)
from vlmspec.runtime.vision.encoder import VisionEncoder

__all__ = ["VisionEncoder"]

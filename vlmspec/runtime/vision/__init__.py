"""Vision encoders, one file per kind; importing this package registers every vision builder."""

from vlmspec.runtime.vision import eva, internvit, siglip, vit  # noqa: F401  (registration)
from vlmspec.runtime.vision.encoder import VisionEncoder

__all__ = ["VisionEncoder"]

"""What an encoder that reads one fixed square per image answers for the model, the processor and the
exporter (which ask every vision encoder): no tiles, no image layout, no native resolution. The ViT kinds
have fields for these; a ConvNeXt or a SAM tower, whose absolute positions or strides fix the size, does not."""

from __future__ import annotations


class FixedSquare:
    """Mixed in before `ComponentSchema`: `class ConvNeXt(FixedSquare, ComponentSchema)`."""

    @property
    def tiles(self) -> int:
        return 0

    @property
    def layout(self) -> str:
        return "fixed"

    @property
    def resolution(self) -> str:
        return "fixed"

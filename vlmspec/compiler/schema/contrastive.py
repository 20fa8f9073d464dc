"""The contrastive head: CLIP / SigLIP pre-training of an image tower against a text tower.

`fusion contrastive(img + txt) { ... }` has no target: its two sources are embedded into one space and
compared, image x text, instead of feeding a language model. Its parameters are the two optional
projections into the shared space, the learned log-scale (inverse temperature) and, for the sigmoid
loss, the learned logit bias.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from vlmspec.compiler.schema.base import ShapeContext, linear, register
from vlmspec.compiler.schema.fusion import FusionBase

#: CLIP's training clamps its learned logit scale at 100 (temperature 0.01) so it cannot blow up.
MAX_LOGIT_SCALE = 100.0


@register
class Contrastive(FusionBase):
    """Image and text towers embedded into one space and trained against each other (CLIP, SigLIP)."""

    kind = "contrastive"
    summary = "image-text contrastive head (CLIP softmax / SigLIP sigmoid loss); no language model"
    in_sequence: ClassVar[bool] = False
    dim: int | None = Field(default=None, gt=0, description="shared embedding width: bias-free projections from "
                            "each tower (CLIP); unset = no projections (SigLIP), the towers' widths must agree")
    loss: Literal["softmax", "sigmoid"] = Field(default="softmax", description="`softmax`: CLIP's symmetric "
                                                "InfoNCE; `sigmoid`: SigLIP's pairwise sigmoid loss")
    temperature: float = Field(default=0.07, gt=0, le=1, description="initial temperature; stored as a learned "
                               "log-scale ln(1/temperature); with the softmax loss training keeps the scale at most 100, as CLIP does")
    bias: float | None = Field(default=None, description="initial logit bias (sigmoid loss only; SigLIP: -10)")
    learn_temperature: bool = Field(default=True, description="whether the log-scale (and bias) are trained")
    weights: str | None = Field(default=None, description="local checkpoint folder (`DIR#head`) to load the "
                                "projections, log-scale and bias from")

    def initial_log_scale(self) -> float:
        return math.log(1.0 / self.temperature)

    def check_towers(self, ctx: ShapeContext, image_width: int, text_width: int) -> None:
        """The rules that need both towers' pooled widths (and the loss)."""
        if self.bias is not None and self.loss == "softmax":
            ctx.sink.error("E0287", f"fusion `{ctx.name}`: `bias` is SigLIP's sigmoid-loss logit bias; the softmax "
                           "loss is unchanged by a constant bias", ctx.span_of("bias"),
                           help="remove `bias`, or set `loss = sigmoid`")
        if self.dim is None and image_width != text_width:
            ctx.sink.error("E0288", f"fusion `{ctx.name}` compares image embeddings of width {image_width} with "
                           f"text embeddings of width {text_width}", ctx.span_of(""),
                           help=f"set `dim = {min(image_width, text_width)}` to project both towers into one space, "
                           "or make the towers' widths agree")

    def tower_params(self, image_width: int, text_width: int) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.dim is not None:
            out["proj_image"] = linear(image_width, self.dim, False)
            out["proj_text"] = linear(text_width, self.dim, False)
        out["logit_scale"] = 1
        if self.loss == "sigmoid":
            out["logit_bias"] = 1
        return out

    def fixed_params(self) -> int:
        """Parameters no stage trains: with `learn_temperature = false`, the log-scale (and the sigmoid loss's
        bias), as the runtime's `ContrastiveHead.fixed_parameters` holds them."""
        return 0 if self.learn_temperature else 1 + (self.loss == "sigmoid")

    def initial_bias(self) -> float:
        """SigLIP starts its bias at -10 so that the many negatives do not dominate the first steps."""
        return self.bias if self.bias is not None else (-10.0 if self.loss == "sigmoid" else 0.0)

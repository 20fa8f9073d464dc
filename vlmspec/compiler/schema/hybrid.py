"""Connector `hybrid`: DeepSeek-VL's aligner, which pairs the tokens of two (or more) encoders one to one.

Each source has its own linear layer to an equal share of the output width; the shares are concatenated
in source order, pass an activation and one more linear layer. Pairing token for token needs every source
on the same grid: a high-resolution encoder reaches the others' grid by its own down-sampler (a `sam`
encoder's `downsample`), and a grid that nothing in the spec brings to the others' is E0265, which names
both grids and what the spec says about resizing them.
"""

from __future__ import annotations

import math

from pydantic import Field

from vlmspec.compiler.schema.base import ShapeContext, TokenShape, linear, register
from vlmspec.compiler.schema.connectors import Act, ConnectorBase


@register
class Hybrid(ConnectorBase):
    """Per-source linear layers to shares of the width, concatenated, an activation, a linear layer."""

    kind = "hybrid"
    summary = "DeepSeek-VL aligner: a linear per source, concatenated token by token, act, linear"
    act: Act = Field(default="gelu", description="activation after the concatenation")

    def check(self, ctx: ShapeContext) -> None:
        if "merge" in self.model_fields_set:
            ctx.sink.error("E0268", "a hybrid connector pairs its sources token by token through a linear layer "
                           "each; `merge` does not apply", ctx.span_of("merge"), help="drop `merge`")
        if len(ctx.inputs) < 2:
            ctx.sink.error("E0268", f"hybrid connector `{ctx.name}` reads {len(ctx.inputs)} source; it pairs the "
                           "tokens of two or more encoders", ctx.span_of(""),
                           help="read both towers (`hybrid(sam + siglip -> llm)`), or use `mlp` for one")
            return
        for name, shape in zip(ctx.sources, ctx.inputs, strict=False):
            side = math.isqrt(shape.tokens)
            if shape.dynamic or shape.layout is not None or side * side != shape.tokens:
                what = ("reads images at their own size" if shape.dynamic else "lays images out in tiles"
                        if shape.layout is not None else f"gives {shape.tokens} tokens, not a square grid")
                ctx.sink.error("E0268", f"hybrid connector `{ctx.name}` pairs square grids token by token; source "
                               f"`{name}` {what}", ctx.span_of(""),
                               help=f"give `{name}` a fixed image_size and select `.patches` (no class token)")
                return
        self._check_grids(ctx)
        n = len(ctx.inputs)
        out = self.out_width(ctx, self.merged_input(ctx).width)
        if out % n:
            ctx.sink.error("E0268", f"output width {out} does not split into {n} equal shares, one per source",
                           ctx.span_of("out") or ctx.span_of(""), help=f"use an output width divisible by {n}")

    def _check_grids(self, ctx: ShapeContext) -> None:
        """E0265 when the sources' grids differ: the target is the grid of a source that cannot resize its own
        (no `downsample`), else the smallest."""
        grids = {name: math.isqrt(s.tokens) for name, s in zip(ctx.sources, ctx.inputs, strict=False)}
        if len(set(grids.values())) < 2:
            return
        fixed = [n for n, cfg in ctx.sources.items() if not hasattr(cfg, "downsample")]
        target = fixed[-1] if fixed else min(grids, key=lambda n: grids[n])
        t = grids[target]
        for name, side in grids.items():
            if side == t:
                continue
            cfg = ctx.sources[name]
            if not hasattr(cfg, "downsample"):
                by = (f"a `{type(cfg).kind}` encoder (it has no down-sampler) and a hybrid connector (it pairs "
                      "tokens without resizing them)")
                help = (f"give `{name}` and `{target}` image sizes with one grid, or read the larger image with a "
                        "`sam` encoder and its `downsample`")
            elif cfg.downsample:
                by = f"downsample = {cfg.downsample} (which makes it {side}x{side})"
                help = f"set `downsample = {t}` on `{name}`"
            else:
                by = (f"`{name}` without `downsample` (its neck keeps the grid) and a hybrid connector (it pairs "
                      "tokens without resizing them)")
                help = f"set `downsample = {t}` on `{name}` (DeepSeek-VL: 24, SigLIP's grid)"
            shown = cfg.grid if hasattr(cfg, "downsample") else side
            ctx.sink.error("E0265", f"grid {shown}x{shown} of `{name}` cannot be resized to the {t}x{t} of "
                           f"`{target}` by {by}", ctx.span_of(""), help=help)

    def merged_input(self, ctx: ShapeContext) -> TokenShape:
        """Tokens paired one to one, widths side by side (what the concatenated shares come from)."""
        ins = ctx.inputs
        if not ins:
            return TokenShape(0, 0)
        return TokenShape(ins[0].tokens, sum(s.width for s in ins), any(s.dynamic for s in ins))

    def out_shape(self, ctx: ShapeContext) -> TokenShape:
        x = self.merged_input(ctx)
        return TokenShape(x.tokens, self.out_width(ctx, x.width), x.dynamic)

    def params(self, ctx: ShapeContext) -> dict[str, int]:
        n = max(len(ctx.inputs), 1)
        out = self.out_width(ctx, self.merged_input(ctx).width)
        share = out // n
        return {"inputs": sum(linear(s.width, share) for s in ctx.inputs), "proj": linear(share * n, out)}

    def subpaths(self) -> list[str]:
        return ["inputs", "proj"]

"""Whether a stage's `packing` can be honoured: a pure pass, stage in, diagnostics out.

Packing puts several samples in one row and keeps each sample's attention inside itself with a
block-diagonal mask and restarted positions (`vlmspec.runtime.train.packing`). That is exact only where
every interaction between tokens goes through that mask and those positions:

- an in-sequence fusion (prefix tokens, a visual expert, routed experts) reads each token on its own or
  through self-attention, so it packs; a cross-attention fusion reads a row's images from every text
  token of the row, so the images of one sample would be read by the next;
- a language model must mask attention (a state-space scan carries state across the row; an
  encoder-decoder row is two sequences);
- BLIP-2's first-stage objectives (itc / itm / itg) train the Q-Former on pairs, with no language rows.
"""

from __future__ import annotations

from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import DiagnosticSink

ATTR = "packing"


def check_packing(ir: ModelIR, spans: SpanTable, stage: Stage, sink: DiagnosticSink) -> None:
    """Report each reason the stage's rows cannot hold several samples exactly."""
    if not stage.packs:
        return
    span = spans.stage_items.get((stage.name, ATTR)) or spans.stages.get(stage.name)
    for fusion in ir.by_role("fusion"):
        if not type(fusion.config).in_sequence:
            what = f"`{fusion.name}`" if fusion.name == fusion.kind else f"`{fusion.name}` (`{fusion.kind}`)"
            sink.error("E0233", f"stage `{stage.name}` packs samples, but fusion {what} lets every text token of "
                       "a row read the row's images, so one sample would read another's", span,
                       help="drop `packing` from this stage; packing works with in-sequence fusions "
                       "(prefix, visual_expert, moe)")
    first = [o.name for o in stage.objective if o.name != "lm"]
    if first:
        sink.error("E0234", f"stage `{stage.name}` packs samples, but its objectives {', '.join(first)} train the "
                   "Q-Former on image-caption pairs, not language-model rows", span,
                   help="drop `packing` from this stage (it applies to `objective lm`)")
    lm = ir.language
    if lm is None:
        return
    if not getattr(type(lm.config), "masks_attention", False):
        why = getattr(type(lm.config), "unpackable", "it has no attention mask to keep them apart")
        sink.error("E0235", f"stage `{stage.name}` packs samples, but language model `{lm.name}` (`{lm.kind}`) cannot "
                   f"keep them apart: {why}", span, help="drop `packing` from this stage")
    if stage.packing is not True and stage.packing > lm.config.max_positions:
        sink.error("E0236", f"stage `{stage.name}` packs rows of {stage.packing} tokens, longer than language model "
                   f"`{lm.name}` reads (max_positions = {lm.config.max_positions})", span,
                   help=f"use `packing = {lm.config.max_positions}` or less, or `packing = true`")

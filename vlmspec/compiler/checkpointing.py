"""Which components a stage's `activation_checkpointing` recomputes: a pure pass, stage in, names out.

Checkpointing a block trades its stored activations for a second forward in the backward pass. It only
pays where the backward pass runs: through every component the stage trains or LoRA-adapts, and through
every component *downstream* of one, frozen or not (a frozen LLM behind a trained connector still
backpropagates through all its layers to reach the connector, and stores their activations to do so).
A frozen component that no gradient reaches (a frozen encoder in front of everything trained) stores
nothing, so checkpointing it would change nothing: `true` leaves it out and naming it is an error.
"""

from __future__ import annotations

from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import DiagnosticSink, did_you_mean

ATTR = "activation_checkpointing"
#: plan statuses whose component has parameters the stage trains (itself, or through LoRA adapters)
TRAINING = ("trained", "lora", "partial")


def backward_path(ir: ModelIR, status: dict[str, str]) -> set[str]:
    """Components the stage's backward pass runs through: those it trains or adapts, and every component
    the data flow carries their output into."""
    successors: dict[str, list[str]] = {name: [] for name in ir.components}
    for c in ir.components.values():
        for src in c.sources:
            successors.setdefault(src, []).append(c.name)
        if c.target is not None:
            successors[c.name].append(c.target)
    reached = {name for name, st in status.items() if st in TRAINING}
    todo = list(reached)
    while todo:
        for nxt in successors.get(todo.pop(), []):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    return reached


def checkpointed_components(ir: ModelIR, spans: SpanTable, stage: Stage, status: dict[str, str],
                            sink: DiagnosticSink) -> list[str]:
    """The components whose blocks the stage recomputes (in declaration order); reports names it cannot honour."""
    value = stage.activation_checkpointing
    if value is False or value == []:
        return []
    path = backward_path(ir, status)
    with_blocks = [name for name, c in ir.components.items() if c.config.checkpointable]
    if value is True:
        return [name for name in with_blocks if name in path]

    def span(name: str):
        return (spans.stage_items.get((stage.name, f"{ATTR}:{name}")) or spans.stage_items.get((stage.name, ATTR))
                or spans.stages.get(stage.name))

    chosen: list[str] = []
    for name in value:
        comp = ir.components.get(name)
        if comp is None:
            head = name.split(".")[0]
            if "." in name and head in ir.components:
                sink.error("E0230", f"stage `{stage.name}`: activation checkpointing is decided per component; "
                           f"`{name}` is a part of `{head}`", span(name), help=f"write `{head}`")
            else:
                sink.error("E0230", f"stage `{stage.name}`: `{name}` is not a component of model `{ir.name}`",
                           span(name), help=did_you_mean(name, list(ir.components)) or
                           "components with blocks: " + ", ".join(with_blocks))
            continue
        if not comp.config.checkpointable:
            sink.error("E0231", f"stage `{stage.name}`: {comp.role} `{name}` (`{comp.kind}`) runs no transformer "
                       "blocks to checkpoint",
                       span(name), help="components with blocks: " + ", ".join(with_blocks) +
                       "; a block-free component's activations are small next to theirs")
            continue
        if name not in path:
            sink.error("E0232", f"stage `{stage.name}` runs no backward pass through `{name}`: it is frozen and "
                       "nothing before it trains, so it stores no activations to spare", span(name),
                       help=f"drop `{name}` from the list" +
                       ("" if not [n for n in with_blocks if n in path] else
                        "; the stage backpropagates through " + ", ".join(n for n in with_blocks if n in path)))
            continue
        if name not in chosen:
            chosen.append(name)
    return chosen

"""Static checks of how an `audio` encoder is wired into a model.

Audio tokens are a 1-D sequence of a clip's frames: they have no patch grid to merge or pool, no image to
pair with another encoder's, and they enter the language model at `<|AUDIO|>` placeholders, one per token
(Qwen2-Audio). So an audio encoder is read alone, by connectors that map tokens one to one (`linear`,
`mlp`), into a `prefix` fusion; and (for now) a model reads one modality. Each rule is its own code,
reported at the flow or component that breaks it, before anything is built.
"""

from __future__ import annotations

from vlmspec.compiler.graph import FlowGraph
from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.diagnostics import DiagnosticSink

#: connector kinds that keep one output token per audio token (the others pool a 2-D patch grid)
AUDIO_CONNECTORS = ("linear", "mlp")


def audio_encoders(ir: ModelIR) -> list[str]:
    return [c.name for c in ir.by_role("audio")]


def check_audio(ir: ModelIR, spans: SpanTable, g: FlowGraph, sink: DiagnosticSink) -> None:
    """E0278 (read with another source), E0279 (a fusion that does not splice tokens in), E0281 (audio and
    vision in one model), E0282 (a connector that pools a patch grid)."""
    encoders = audio_encoders(ir)
    if not encoders:
        return
    vision = ir.by_role("vision")
    if vision:
        sink.error("E0281", f"model `{ir.name}` reads both audio (`{encoders[0]}`) and images (`{vision[0].name}`)",
                   spans.components.get(vision[0].name),
                   help="a model reads one modality for now: keep the audio encoder or the vision encoders")
    downstream: set[str] = set()
    stack = list(encoders)
    while stack:
        n = stack.pop()
        for succ in g.successors(n):
            if succ not in downstream:
                downstream.add(succ)
                stack.append(succ)
    for name in sorted(downstream, key=list(ir.components).index):
        comp = ir.components[name]
        if len(comp.sources) > 1:
            heard = next(s for s in comp.sources if s in encoders or s in downstream)
            sink.error("E0278", f"{comp.role} `{name}` reads the audio tokens of `{heard}` together with "
                       + ", ".join(f"`{s}`" for s in comp.sources if s != heard), spans.components.get(name),
                       help="audio tokens have no image to pair with: give the audio encoder its own connector")
        if comp.role == "connector" and comp.kind not in AUDIO_CONNECTORS:
            sink.error("E0282", f"a `{comp.kind}` connector pools a patch grid, which audio tokens do not have",
                       spans.components.get(name),
                       help="read an audio encoder with `linear(...)` or `mlp(...)`; pool inside the encoder "
                       "(`pool = 2`)")
        if comp.role == "fusion" and not type(comp.config).in_sequence:
            sink.error("E0279", f"audio tokens reach the language model through a `{comp.kind}` fusion, which does "
                       "not splice them into the prompt", spans.components.get(name),
                       help='use `fusion prefix(proj -> llm) { image_token = "<|AUDIO|>" }`')

"""Validation passes: pure functions from the IR (and its graph) to diagnostics and derived facts.

Order: structure (names, roles, flows, cycles) -> shapes and parameters -> stages. Each pass
collects every problem it finds; a later pass runs only when the earlier ones found no error, so
that one mistake is reported once, where it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmspec.compiler.checkpointing import checkpointed_components
from vlmspec.compiler.graph import FlowGraph, build_graph
from vlmspec.compiler.ir import ModelIR, SpanTable
from vlmspec.compiler.packing import check_packing
from vlmspec.compiler.schema.base import ShapeContext, TokenShape
from vlmspec.compiler.schema.contrastive import Contrastive
from vlmspec.compiler.schema.fusion import FusionBase, MoEFusion
from vlmspec.compiler.schema.language import LanguageBase
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import DiagnosticSink, did_you_mean

# ------------------------------------------------------------------ structure

_SOURCE_ROLES = {"connector": ("vision", "audio", "connector"), "fusion": ("vision", "connector")}
_TARGET_ROLES = {"connector": ("connector", "language"), "fusion": ("language",)}
#: the roles a component with no flow of its own has: encoders and the language model
_TOWER_ROLES = ("vision", "audio", "text", "language")


def _is_contrastive(c) -> bool:
    return isinstance(c.config, Contrastive)


def check_structure(ir: ModelIR, spans: SpanTable, sink: DiagnosticSink) -> FlowGraph:
    """Names in flows exist and have the right roles; one language model; no cycles; nothing dangling."""
    comps = ir.components
    for c in comps.values():
        has_flow = bool(c.sources) or c.target is not None
        if c.role in _TOWER_ROLES and has_flow:
            sink.error("E0310", f"a {c.role} component takes no `(source -> target)` flow", spans.components.get(c.name),
                       help=f"write `{c.role} {c.name} = {c.kind} {{ ... }}`")
        if c.role in ("connector", "fusion") and not has_flow:
            sink.error("E0311", f"{c.role} `{c.name}` needs a flow such as `(clip -> llm)`", spans.components.get(c.name))
        if c.role in _TOWER_ROLES:
            continue
        if _is_contrastive(c):
            _check_contrastive_flow(ir, spans, sink, c)
            continue
        if has_flow and c.target is None:
            sink.error("E0283", f"{c.role} `{c.name}` has no target: only a contrastive fusion compares its sources "
                       "without feeding a language model", spans.components.get(c.name),
                       help=f"write `({' + '.join(c.sources)} -> LLM)`, or `fusion contrastive(IMAGE + TEXT)`")
        for src in c.sources:
            _check_ref(ir, spans, sink, c.name, src, _SOURCE_ROLES[c.role], "source")
        if c.target is not None:
            _check_ref(ir, spans, sink, c.name, c.target, _TARGET_ROLES[c.role], "target")

    lms = ir.by_role("language")
    heads = [c for c in ir.by_role("fusion") if _is_contrastive(c)]
    if heads:  # a contrastive model is two towers and a head: nothing generates text
        for extra in heads[1:]:
            sink.error("E0289", f"model `{ir.name}` has more than one contrastive fusion",
                       spans.components.get(extra.name), help="a model trains one image-text embedding space")
        for lm in lms:
            sink.error("E0286", f"model `{ir.name}` has a contrastive fusion and a language model `{lm.name}`",
                       spans.components.get(lm.name),
                       help="a contrastive model (CLIP, SigLIP) embeds images and text and generates nothing: "
                       "remove the language model, or keep the towers and write a generative model apart")
        for c in ir.components.values():
            if c.role in ("connector", "fusion") and not _is_contrastive(c) and c.target is not None:
                sink.error("E0286", f"{c.role} `{c.name}` feeds a language model in a contrastive model",
                           spans.components.get(c.name),
                           help="a contrastive model has no language model to feed; remove this component")
    elif not lms:
        sink.error("E0313", f"model `{ir.name}` has no language model", spans.model,
                   help="add e.g. `language llm = llama { ... }`")
    for extra in lms[1:]:
        sink.error("E0313", f"model `{ir.name}` has more than one language model", spans.components.get(extra.name),
                   help="vlmspec models have one language model; merge encoders with connectors instead")

    if ir.settings.chat_template is not None:  # the template lays out prompts and answers itself
        defaults = type(ir.settings).model_fields
        for k in ("prompt", "answer"):
            if getattr(ir.settings, k) != defaults[k].default:
                sink.error("E0201", f"`{k}` would be ignored: `chat_template` lays out prompts and answers",
                           spans.attrs.get(("model", k)), help=f"remove `{k}` or `chat_template`")

    g = build_graph(ir)
    if sink.has_errors:  # a flow into the wrong role can look like a cycle; report the root cause only
        return g
    cycle = g.cycle()
    if cycle:
        sink.error("E0305", "data flow forms a cycle: " + " -> ".join([*cycle, cycle[0]]),
                   spans.components.get(cycle[0]))
    if sink.has_errors:
        return g

    # every connector's declared target agrees with who consumes it
    for c in ir.by_role("connector"):
        target = comps.get(c.target) if c.target else None
        if target is None:
            continue
        if target.role == "connector" and c.name not in target.sources:
            sink.error("E0314", f"connector `{c.name}` flows into `{target.name}`, but `{target.name}` does not read it",
                       spans.flows.get((c.name, target.name)),
                       help=f"add `{c.name}` to the sources of `{target.name}`")
        if target.role == "language":
            fusions = [f for f in ir.by_role("fusion") if c.name in f.sources]
            if not fusions:
                sink.error("E0304", f"connector `{c.name}` reaches `{target.name}` through no fusion",
                           spans.flows.get((c.name, target.name)),
                           help=f"add `fusion prefix({c.name} -> {target.name})` (or cross_attention, "
                           "visual_expert, moe)")
    for v in ir.by_role("vision") + ir.by_role("text"):
        if not any(v.name in c.sources for c in comps.values()):
            sink.warning("W0301", f"vision encoder `{v.name}` feeds nothing", spans.components.get(v.name),
                         help=f"name it as a connector's source, e.g. `mlp({v.name} -> llm)`")
    return g


def _check_contrastive_flow(ir: ModelIR, spans: SpanTable, sink: DiagnosticSink, c) -> None:
    """`contrastive(img + txt)`: one image side (an encoder or a connector after one), one text tower, no target."""
    if c.target is not None:
        sink.error("E0284", f"contrastive fusion `{c.name}` has a target `{c.target}`: it compares its sources "
                   "and feeds nothing", spans.flows.get((c.name, c.target)) or spans.components.get(c.name),
                   help=f"write `fusion contrastive({' + '.join(c.sources)})`")
    for src in c.sources:
        _check_ref(ir, spans, sink, c.name, src, ("vision", "connector", "text"), "source")
    roles = [ir.components[s].role for s in c.sources if s in ir.components]
    if len(roles) == len(c.sources):
        image = [r for r in roles if r in ("vision", "connector")]
        text = [r for r in roles if r == "text"]
        if len(c.sources) != 2 or len(image) != 1 or len(text) != 1:
            sink.error("E0285", f"contrastive fusion `{c.name}` reads {len(image)} image and {len(text)} text "
                       "source(s); it compares exactly one of each", spans.components.get(c.name),
                       help="write `fusion contrastive(IMAGE + TEXT)`, e.g. `contrastive(img + txt)`")


def _check_ref(ir: ModelIR, spans: SpanTable, sink: DiagnosticSink, owner: str, ref: str,
               roles: tuple[str, ...], what: str) -> None:
    comp = ir.components.get(ref)
    span = spans.flows.get((owner, ref)) or spans.components.get(owner)
    if comp is None:
        sink.error("E0101", f"unknown component `{ref}` (the {what} of `{owner}`)", span,
                   help=did_you_mean(ref, ir.components) or _known(ir.components))
        return
    if comp.role not in roles:
        sink.error("E0312", f"`{ref}` is a {comp.role} component and cannot be the {what} of `{owner}`", span,
                   help=f"the {what} must be a " + " or ".join(roles) + " component")


def _known(names) -> str:
    return "known components: " + ", ".join(f"`{n}`" for n in sorted(names)) if names else "no components yet"


# ------------------------------------------------------------------ shapes and parameters


@dataclass(slots=True)
class Shapes:
    out: dict[str, TokenShape] = field(default_factory=dict)  # vision / connector outputs; fusion: visual input
    params: dict[str, dict[str, int]] = field(default_factory=dict)
    contexts: dict[str, ShapeContext] = field(default_factory=dict)

    def total(self, name: str) -> int:
        return sum(self.params.get(name, {}).values())

    @property
    def grand_total(self) -> int:
        return sum(self.total(n) for n in self.params)


def infer_shapes(ir: ModelIR, spans: SpanTable, g: FlowGraph, sink: DiagnosticSink) -> Shapes:
    """Shapes end to end (tokens x width per image), the rules that need them, and parameter counts."""
    shapes = Shapes()
    lm_comp = ir.language
    llm: LanguageBase | None = lm_comp.config if lm_comp is not None else None  # type: ignore[assignment]
    wrong_width: set[str] = set()
    for name in g.topological_order():
        comp = ir.components[name]
        cfg = comp.config
        inputs = [shapes.out[s] for s in comp.sources if s in shapes.out]
        target_width = None
        if comp.role == "connector":
            readers = [ir.components[n] for n in g.successors(name)]
            if any(r.role == "fusion" and type(r.config).in_sequence for r in readers) and llm is not None:
                target_width = llm.width
        ctx = ShapeContext(name=name, inputs=inputs, target_width=target_width, sink=sink,
                           span_of=lambda attr, n=name: spans.attr(n, attr) if attr else spans.components.get(n),
                           llm_depth=llm.depth if llm else None,
                           sources={s: ir.components[s].config for s in comp.sources if s in shapes.out})
        shapes.contexts[name] = ctx
        laid = next((s.layout[0] for s in inputs if s.layout is not None), None)
        if comp.role == "connector" and laid is not None and comp.kind not in laid.readers:
            kinds = " or ".join(f"`{k}`" for k in laid.readers)
            what = "an anyres encoder" if laid.call == "anyres" else f"a `{laid.call}` encoder"
            sink.error("E0220", f"a `{comp.kind}` connector reads {what}, whose tiles only "
                       f"{'an' if len(laid.readers) == 1 else 'a'} {kinds} connector {laid.readers_why}",
                       spans.components.get(name),
                       help=f"read the {laid.call} encoder with {' or '.join(f'`{k}(...)`' for k in laid.readers)}, "
                       "or drop its `layout`")
        if comp.role == "connector" and laid is not None and len(inputs) > 1:
            what = "an anyres encoder" if laid.call == "anyres" else f"a `{laid.call}` encoder"
            sink.error("E0219", f"{what}'s tiles are laid out by a connector that reads it alone",
                       spans.components.get(name), help=f"give the {laid.call} encoder its own connector")
        if hasattr(cfg, "check"):
            cfg.check(ctx)
        if comp.role in ("vision", "audio", "connector"):
            shapes.out[name] = cfg.out_shape(ctx)
            shapes.params[name] = cfg.params(ctx)
            width = shapes.out[name].width
            if target_width is not None and width != target_width and llm is not None and lm_comp is not None:
                sink.error("E0203", f"connector `{name}` outputs width {width} but `{lm_comp.name}` expects "
                           f"{target_width}", spans.attr(name, "out"),
                           help="leave `out` unset: a connector into a language model ends at its width")
                wrong_width.add(name)
        elif comp.role == "text":  # a text tower (CLIP / SigLIP): one pooled embedding per caption
            shapes.out[name] = cfg.out_shape(ctx) if hasattr(cfg, "out_shape") else TokenShape(1, cfg.width)
            shapes.params[name] = cfg.params(ctx)
        elif comp.role == "fusion" and isinstance(cfg, Contrastive):
            by_role = {ir.components[s].role: shapes.out[s] for s in comp.sources if s in shapes.out}
            image = by_role.get("vision") or by_role.get("connector")
            text = by_role.get("text")
            if image is not None and text is not None:
                cfg.check_towers(ctx, image.width, text.width)
                shapes.params[name] = cfg.tower_params(image.width, text.width)
                shapes.out[name] = TokenShape(1, cfg.dim or image.width)
        elif comp.role == "fusion" and llm is not None:
            visual = _sequence_merge(inputs)
            widths = sorted({s.width for s in inputs})
            if len(widths) > 1:
                sink.error("E0203", f"fusion `{name}` reads sources of different widths {widths}",
                           spans.components.get(name), help="end every source at the same width (one connector each)")
            shapes.out[name] = visual
            fusion: FusionBase = cfg  # type: ignore[assignment]
            if any(s in wrong_width for s in comp.sources):  # reported once, at the connector
                visual = TokenShape(visual.tokens, llm.width, visual.dynamic)
            hosts = getattr(llm, "hosts_fusion", None)  # a kind that cannot host every style (mamba) says so
            if hosts is not None and not hosts(ctx, fusion):
                shapes.params[name] = {}
                continue
            fusion.check_against(ctx, visual, llm)
            shapes.params[name] = fusion.params_for(llm, visual)
        elif comp.role == "language":
            shapes.params[name] = cfg.params(ctx)
    if llm is not None and lm_comp is not None:
        in_seq = sum(shapes.out[f.name].tokens for f in ir.by_role("fusion")
                     if type(f.config).in_sequence and f.name in shapes.out)
        if in_seq + 1 > llm.max_positions:
            sink.error("E0211", f"{in_seq} image tokens per image do not fit in the language model's "
                       f"max_positions = {llm.max_positions}", spans.attr(lm_comp.name, "max_positions"),
                       help="use fewer visual tokens (a resampler, patch merger or pooling) or a longer context")
    return shapes


def _sequence_merge(inputs: list[TokenShape]) -> TokenShape:
    if not inputs:
        return TokenShape(0, 0)
    if len(inputs) == 1:
        return inputs[0]
    return TokenShape(sum(s.tokens for s in inputs), inputs[0].width, any(s.dynamic for s in inputs))


# ------------------------------------------------------------------ stages


@dataclass(slots=True)
class StagePlan:
    """What one stage does to each component, and how many parameters it trains."""

    name: str
    status: dict[str, str]  # component -> "trained" | "frozen" | "lora" | "partial" | "empty"
    trainable: dict[str, int]  # component -> trainable parameters
    lora_params: int
    #: components whose transformer blocks `activation_checkpointing` recomputes (vlmspec.compiler.checkpointing)
    checkpointed: list[str] = field(default_factory=list)

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())


def valid_paths(ir: ModelIR) -> list[str]:
    paths = ["fusion"] if ir.by_role("fusion") else []
    for c in ir.components.values():
        paths.append(c.name)
        paths.extend(f"{c.name}.{p}" for p in c.config.subpaths())
    return paths


def part_params(ir: ModelIR, shapes: Shapes, path: str) -> int:
    """Parameters under a graph path such as `llm`, `llm.moe` or `clip.attn`, as the component's kind counts them."""
    comp_name, _, sub = path.partition(".")
    llm = ir.language.config if ir.language is not None else None
    return ir.components[comp_name].config.part_params(sub, shapes.params.get(comp_name, {}), llm)


def lora_params(ir: ModelIR, comp_name: str, targets: list[str], rank: int) -> int:
    """Adapter parameters LoRA adds: rank x (in + out) for every wrapped linear layer."""
    cfg = ir.components[comp_name].config
    total = 0
    if isinstance(cfg, LanguageBase) and not hasattr(cfg, "lora_dims"):  # persimmon declares its own (fused qkv)
        q, kv, w, f = cfg.heads * cfg.hd, cfg.n_kv * cfg.hd, cfg.width, cfg.ffn
        dims = {"attn.q": (w, q), "attn.k": (w, kv), "attn.v": (w, kv), "attn.o": (q, w),
                "mlp.gate": (w, f), "mlp.up": (w, f), "mlp.down": (f, w), "mlp.fc1": (w, f), "mlp.fc2": (f, w)}
        for t in targets:
            i, o = dims.get(t, (0, 0))
            total += cfg.depth * rank * (i + o)
    elif hasattr(cfg, "lora_dims"):  # a kind that declares its targets' shapes itself (mamba)
        dims = cfg.lora_dims()
        for t in targets:
            i, o = dims.get(t, (0, 0))
            layers = cfg.lora_layers(t) if hasattr(cfg, "lora_layers") else cfg.depth  # t5: two stacks
            total += layers * rank * (i + o)
    elif ir.components[comp_name].role == "vision":
        w, m = cfg.width, cfg.mlp_dim
        dims = {"attn.q": (w, w), "attn.k": (w, w), "attn.v": (w, w), "attn.o": (w, w),
                "mlp.fc1": (w, m), "mlp.fc2": (m, w)}
        for t in targets:
            i, o = dims.get(t, (0, 0))
            total += cfg.depth * rank * (i + o)
    return total


def default_lora_targets(cfg) -> list[str]:
    own = getattr(cfg, "default_lora_targets", None)  # a kind without attention (mamba) names its own
    if own is not None:
        return own()
    return [t for t in cfg.lora_targets() if t.startswith("attn.") and t[-1] in "qv"]


def check_stages(ir: ModelIR, spans: SpanTable, shapes: Shapes, sink: DiagnosticSink) -> list[StagePlan]:
    plans = []
    paths = valid_paths(ir)
    fusion_names = [c.name for c in ir.by_role("fusion")]
    for stage in ir.stages:
        plans.append(_check_stage(ir, spans, shapes, sink, stage, paths, fusion_names))
    return plans


def _expand(path: str, fusion_names: list[str]) -> list[str]:
    head, _, rest = path.partition(".")
    if head == "fusion" and "fusion" not in fusion_names:
        return [f"{f}.{rest}" if rest else f for f in fusion_names]
    return [path]


def _check_stage(ir: ModelIR, spans: SpanTable, shapes: Shapes, sink: DiagnosticSink, stage: Stage,
                 paths: list[str], fusion_names: list[str]) -> StagePlan:
    def span(key: str):
        return spans.stage_items.get((stage.name, key)) or spans.stages.get(stage.name)

    decisions: dict[str, str] = {}
    for kw, items in (("train", [t.path for t in stage.train]), ("freeze", stage.freeze),
                      ("lora", [lo.path for lo in stage.lora])):
        for raw in items:
            if raw not in paths:
                sink.error("E0406", f"stage `{stage.name}`: `{raw}` is not a part of model `{ir.name}`",
                           span(f"{kw}:{raw}"), help=did_you_mean(raw, paths) or "parts: " + ", ".join(paths))
                continue
            for p in _expand(raw, fusion_names):
                decisions[p] = kw

    for t in stage.train:
        if t.lr is not None and t.path in paths and not any(part_params(ir, shapes, p) for p in _expand(t.path, fusion_names)):
            sink.error("E0411", f"stage `{stage.name}`: the learning rate of `{t.path}` reaches no parameter",
                       span(f"train:{t.path}"), help=f"`{t.path}` has no parameters in model `{ir.name}`: drop "
                       "its `lr`, or give the rate to a part that has some")

    lora_total = 0
    for lo in stage.lora:
        for p in _expand(lo.path, fusion_names):
            if p not in ir.components:
                if p in paths:
                    sink.error("E0403", f"LoRA wraps whole components; `{p}` is a part of one", span(f"lora:{lo.path}"),
                               help=f"write `lora {p.split('.')[0]}(targets = [...])`")
                continue
            cfg = ir.components[p].config
            allowed = cfg.lora_targets()
            if not allowed:
                sink.error("E0403", f"`{p}` has no layers LoRA can adapt", span(f"lora:{lo.path}"),
                           help=f"train it instead: `train {p}`" if shapes.total(p) else
                           "LoRA adapts the linear layers of encoders and language models")
                continue
            targets = lo.targets or default_lora_targets(cfg)
            for t in targets:
                if t not in allowed:
                    sink.error("E0403", f"LoRA target `{t}` does not exist in `{p}`", span(f"lora:{lo.path}"),
                               help=did_you_mean(t, allowed) or "targets: " + ", ".join(allowed))
            lora_total += lora_params(ir, p, [t for t in targets if t in allowed], lo.rank)

    status: dict[str, str] = {}
    trainable: dict[str, int] = {}
    for name, comp in ir.components.items():
        total = shapes.total(name)
        whole = decisions.get(name)
        subs = {p: a for p, a in decisions.items() if p.startswith(name + ".")}
        if total == 0 and not whole and not subs:
            status[name] = "empty"
            trainable[name] = 0
            continue
        if whole is None:
            if subs:
                sink.error("E0401", f"stage `{stage.name}` decides parts of `{name}` ({', '.join(sorted(subs))}) "
                           f"but not the rest of it", spans.stages.get(stage.name),
                           help=f"add `freeze {name}` (or `train {name}`); the more specific path wins")
            else:
                sink.error("E0401", f"stage `{stage.name}` neither trains nor freezes `{name}`",
                           spans.stages.get(stage.name), help=f"add `train {name}` or `freeze {name}`")
            status[name] = "undecided"
            trainable[name] = 0
            continue
        count = total if whole == "train" else 0
        for p, action in subs.items():
            part = part_params(ir, shapes, p)
            if action == "train" and whole != "train":
                count += part
            elif action != "train" and whole == "train":
                count -= part
        if whole == "train" and subs:
            status[name] = "partial"
        elif whole == "train":
            status[name] = "trained"
        elif whole == "lora":
            status[name] = "lora" if not any(a == "train" for a in subs.values()) else "partial"
        else:
            status[name] = "partial" if any(a == "train" for a in subs.values()) else "frozen"
        if whole == "train" and not subs:
            count = total if not isinstance(comp.config, MoEFusion) else part_params(ir, shapes, name)
        fixed = getattr(comp.config, "fixed_params", None)  # what the spec holds fixed whatever a stage says
        if whole == "train" and callable(fixed):
            count -= fixed()
        trainable[name] = max(count, 0)

    for up in stage.upcycle:
        _check_upcycle(ir, stage, up.source, up.dest, span("upcycle"), sink)

    if any(o.name in ("itc", "itm", "itg") for o in stage.objective):
        qformers = [c for c in ir.by_role("connector") if c.kind == "qformer"]
        if not qformers:
            sink.error("E0409", f"stage `{stage.name}`: objectives itc / itm / itg need a Q-Former connector",
                       span("objective"), help="use `objective lm`, or add `connector qf = qformer(...)`")
        elif not (qformers[0].config.pretrain and qformers[0].config.text_ffn):
            qf = qformers[0]
            missing = " and ".join(f"`{k} = true`" for k in ("pretrain", "text_ffn") if not getattr(qf.config, k))
            sink.error("E0410", f"stage `{stage.name}`: objectives itc / itm / itg train the text side of Q-Former "
                       f"`{qf.name}`, which it does not have", span("objective"),
                       help=f"set {missing} in `{qf.name}` (the text embeddings, text feed-forwards and heads "
                       "of BLIP-2's first stage)")

    _check_contrastive_objective(ir, stage, span("objective"), sink)
    check_packing(ir, spans, stage, sink)
    plan = StagePlan(stage.name, status, trainable, lora_total,
                     checkpointed_components(ir, spans, stage, status, sink))
    if not sink.has_errors and plan.total_trainable + lora_total == 0:
        sink.error("E0402", f"stage `{stage.name}` trains nothing", spans.stages.get(stage.name),
                   help="name what it trains: `train proj`, or adapt with `lora llm(rank = 16)`")
    return plan


def _check_upcycle(ir: ModelIR, stage: Stage, source: str, dest: str, span, sink: DiagnosticSink) -> None:
    lm = ir.language
    if lm is None:
        return
    moe_fusions = [c.name for c in ir.by_role("fusion") if isinstance(c.config, MoEFusion)]
    valid_dest = ([f"{lm.name}.moe"] if lm.config.moe is not None else []) + moe_fusions + \
        (["fusion"] if moe_fusions else [])
    if source != f"{lm.name}.mlp":
        sink.error("E0407", f"stage `{stage.name}`: up-cycling starts from the dense FFN `{lm.name}.mlp`, not `{source}`",
                   span)
    if dest not in valid_dest:
        sink.error("E0407", f"stage `{stage.name}`: `{dest}` holds no experts to up-cycle into", span,
                   help=("experts live in " + ", ".join(f"`{d}`" for d in valid_dest)) if valid_dest
                   else f"add `moe {{ experts = 4  top_k = 2 }}` to `{lm.name}` or a `fusion moe(...)`")


def _check_contrastive_objective(ir: ModelIR, stage: Stage, span, sink: DiagnosticSink) -> None:
    """A contrastive model trains `objective contrastive` alone; no other model can."""
    names = [o.name for o in stage.objective]
    head = next((c for c in ir.by_role("fusion") if _is_contrastive(c)), None)
    if head is not None and names != ["contrastive"]:
        sink.error("E0316", f"stage `{stage.name}` trains `{' + '.join(names)}`, and a contrastive model has no "
                   "language model to train it with", span,
                   help=f"write `objective contrastive` (the loss, `{head.config.loss}`, is the fusion's `loss`)")
    elif head is None and "contrastive" in names:
        sink.error("E0315", f"stage `{stage.name}`: `objective contrastive` needs a contrastive fusion", span,
                   help="add `fusion contrastive(IMAGE + TEXT) { ... }` with a `text` tower, or use `objective lm`")


def weights_location(value: str, spec_file: str) -> tuple[Path, str | None]:
    """`weights = "DIR"` or `"DIR#part"` -> (folder, part). A relative folder is read from the spec's
    folder: one rule for `vlm check` and for the loader."""
    folder, part = value.rsplit("#", 1) if "#" in value else (value, None)
    path = Path(folder).expanduser()
    if not path.is_absolute():
        path = Path(spec_file).resolve().parent / path
    return path, part or None


def check_weights(ir: ModelIR, spans: SpanTable, spec_file: str, sink: DiagnosticSink) -> None:
    """Warn (not fail: a spec is often reviewed where its checkpoints are not) when a component's
    `weights` folder is missing or has no config.json, the file its family is read from. Relative
    folders are read from the spec's folder (`weights_location`, which the loader uses too)."""
    for comp in ir.components.values():
        value = getattr(comp.config, "weights", None)
        if not value:
            continue
        path, _ = weights_location(value, spec_file)
        folder = value.rsplit("#", 1)[0]
        span = spans.attr(comp.name, "weights")
        if not path.is_dir():
            sink.warning("W0111", f"weights folder `{folder}` of `{comp.name}` does not exist", span,
                         help=f"it is read when the model is built; relative folders are read from "
                         f"{Path(spec_file).resolve().parent}")
        elif not (path / "config.json").is_file():
            sink.warning("W0111", f"weights folder `{folder}` of `{comp.name}` has no config.json", span,
                         help="vlmspec reads the checkpoint's family (`model_type`) from it; save the model with "
                         "`save_pretrained`")

"""`vlm summary` data: parameters per component (closed form), visual tokens, and per stage the trainable
parameters and a memory estimate per rank (weights, gradients, optimizer state, activations). Pure data here;
the CLI renders it."""

from __future__ import annotations

from typing import Any

from vlmspec.compiler.activations import Sequence, activation_bytes, micro_batch, spec_sequence
from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.base import BYTES_PER

_OPTIM_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}


def component_bytes(analysis: Analysis, name: str, quantized: bool = True) -> float:
    cfg = analysis.ir.components[name].config
    dtype = getattr(cfg, "dtype", "fp32")
    quant = getattr(cfg, "quantize", "none") if quantized else "none"
    per = BYTES_PER[quant] if quant != "none" else BYTES_PER[dtype]
    return analysis.shapes.total(name) * per


def summarise(analysis: Analysis, *, ranks: int = 1, fsdp: bool = False, sequence: Sequence | None = None,
              sequences: dict[str, Sequence] | None = None) -> dict[str, Any]:
    """The summary, with each stage's memory per rank of `ranks`: under `fsdp` the weights, gradients and
    optimizer state of the components a stage trains are sharded over the ranks (the rest is replicated);
    activations follow the micro-batch one rank runs (batch / (grad_accum x ranks)) and the sequence length:
    `sequences[stage]`, else `sequence`, else what the spec gives (`activations.spec_sequence`)."""
    ir, shapes = analysis.ir, analysis.shapes
    components = []
    for name, comp in ir.components.items():
        out = shapes.out.get(name)
        components.append({
            "name": name, "role": comp.role, "kind": comp.kind,
            "params": shapes.total(name),
            "parts": dict(shapes.params.get(name, {})),
            "tokens": out.tokens if out is not None and comp.role != "language" else None,
            "width": out.width if out is not None and comp.role != "language" else None,
            "dtype": getattr(comp.config, "dtype", None),
            "quantize": getattr(comp.config, "quantize", None),
        })
    weights = sum(component_bytes(analysis, n) for n in ir.components)
    weights_unquantized = sum(component_bytes(analysis, n, quantized=False) for n in ir.components)
    stages = []
    ranks = max(ranks, 1)
    for i, (plan, stage) in enumerate(zip(analysis.plans, ir.stages, strict=True)):
        trainable = plan.total_trainable + plan.lora_params
        grad_bytes = 4  # gradients follow the fp32 master weights, autocast or not
        optim_bytes = _OPTIM_STATE_BYTES[stage.optim.name]
        if stage.optim.name == "sgd" and stage.optim.momentum == 0:
            optim_bytes = 0
        shards = ranks if fsdp or stage.fsdp else 1
        sharded = sum(component_bytes(analysis, n) for n, st in plan.status.items() if st in ("trained", "partial"))
        seq = (sequences or {}).get(stage.name) or sequence or spec_sequence(analysis, i)
        act = activation_bytes(analysis, i, micro_batch(analysis, i, ranks), seq)
        memory: dict[str, Any] = {
            "weights": int(weights - sharded + sharded / shards), "grads": trainable * grad_bytes // shards,
            "optimizer": trainable * optim_bytes // shards, "activations": act.total}
        memory["total"] = sum(memory.values())
        memory.update(ranks=ranks, sharded=shards > 1, micro_batch=act.micro_batch,
                      sequence={"tokens": seq.tokens, "image_tokens": seq.image_tokens, "source": seq.source},
                      activations_by_component=act.by_component)
        stages.append({
            "name": stage.name,
            "params": {"trainable": trainable, "lora": plan.lora_params,
                       "by_component": {k: v for k, v in plan.trainable.items() if v}},
            "status": plan.status,
            "precision": stage.precision,
            "optim": stage.optim.to_vlm(),
            "batch": stage.batch,
            "memory": memory,
        })
    visual = [c for c in ir.by_role("fusion") if c.name in shapes.out]
    return {
        "model": ir.name,
        "file": analysis.file,
        "params": {"total": shapes.grand_total, "by_component": {c["name"]: c["params"] for c in components}},
        "visual_tokens": {f.name: shapes.out[f.name].tokens for f in visual},
        "image_layouts": image_layouts(analysis),
        "video_tokens": video_tokens(analysis.ir),
        "memory": {"weights": int(weights), "weights_unquantized": int(weights_unquantized)},
        "components": components,
        "stages": stages,
    }


def video_tokens(ir: Any) -> dict[str, dict[str, int]]:
    """Per encoder with `video = frames(...)`, the tokens one video takes: fewest (one temporal patch at the
    smallest frame) and most (the most frames at the largest, capped by `max_tokens`), as `check_video` counts."""
    from vlmspec.compiler.video import budget, video_encoders

    return {n: {"min": (b := budget(ir, n)).fewest, "max": b.most, "min_pixels": b.min_pixels,
                "max_pixels": b.max_pixels} for n in video_encoders(ir)}


def image_layouts(analysis: Analysis) -> dict[str, dict[str, int]]:
    """Per encoder with an image layout (`anyres`, `dynamic_tiles`, `split`), the image tokens one image
    takes: the fewest and most any image can (its size decides), and how many a square `image_size` image
    takes (what `vlm summary` calls the default); counted after the connector that reads its tiles."""
    out = {}
    ir = analysis.ir
    for comp in ir.by_role("vision"):
        v = comp.config
        layout = getattr(v, "layout", "fixed")
        if isinstance(layout, str):
            continue
        readers = [c.name for c in ir.by_role("connector") if comp.name in c.sources]
        tile = analysis.shapes.out[readers[0]].tile_tokens if readers else None
        if tile is None:
            continue
        s, p = v.image_size, v.patch_size
        lo, hi = layout.token_range(s, p, tile)
        out[comp.name] = {"layout": layout.call, "min": lo, "max": hi,
                          "at_image_size": layout.image_tokens(s, s, s, p, tile), "image_size": s}
    return out


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (parameters) or with unit 'B' -> '1.15 GiB'."""
    if unit == "B":
        for suffix, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if abs(n) >= size:
                return f"{n / size:.2f} {suffix}"
        return f"{int(n)} B"
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return str(int(n))

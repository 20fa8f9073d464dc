"""What a run folder says about itself (`run.json`), and how a changed stage schedule is taken up.

The manifest records the spec's hashes and each stage's definition and state, so that `--resume` can tell
a run of another architecture (refused) from the same architecture under an edited schedule (taken up
where that is sound, `take_up_schedule`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.fsutil import atomic_write_text

MANIFEST_VERSION = 1


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps(manifest, indent=2))


def new_manifest(analysis: Analysis, spec_ref: str) -> dict[str, Any]:
    stages = analysis.ir.stages
    return {"version": MANIFEST_VERSION, "spec": spec_ref, "model": analysis.ir.name,
            "spec_hash": spec_hash(analysis), "architecture_hash": architecture_hash(analysis),
            "stages": [{"name": s.name, "index": i + 1, "state": "pending",
                        "output": f"stages/{i + 1:02d}-{s.name}/weights.safetensors",
                        "definition": s.model_dump(mode="json")}
                       for i, s in enumerate(stages)]}


def spec_hash(analysis: Analysis) -> str:
    return hashlib.sha256(analysis.ir.model_dump_json().encode()).hexdigest()[:16]


def architecture_hash(analysis: Analysis) -> str:
    """The spec without its stage schedule: what a run's tensors are tied to."""
    return hashlib.sha256(analysis.ir.model_dump_json(exclude={"stages"}).encode()).hexdigest()[:16]

#: Stage fields a stage in progress can take up from its checkpoint on: how long it runs, on what data,
#: with which rates. The rest (what it trains, its optimizer's kind, its objective) fixes the shape of
#: the optimizer state and of what the checkpoint holds.
SCHEDULE_ONLY = ("steps", "epochs", "data", "batch", "grad_accum", "precision", "warmup", "schedule", "clip_grad",
                 "max_length", "optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.momentum")


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def stage_changes(old: dict[str, Any], new: Stage) -> dict[str, tuple[Any, Any]]:
    """field -> (old, new) for what changed in a stage's definition (`steps`: (200, 60))."""
    a, b = _leaves(old), _leaves(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _show(changes: dict[str, tuple[Any, Any]]) -> str:
    def fmt(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, str) else v

    return ", ".join(f"{k} {fmt(a)} -> {fmt(b)}" for k, (a, b) in changes.items())


def take_up_schedule(run_dir: Path, manifest: dict[str, Any], stages: list[Stage], *, resume: bool,
                 log: Callable[[str], None]) -> None:
    """The spec changed only in its stage schedule since the run began: say what changed and carry on
    where that is sound (a pending stage takes any change; a stage in progress takes new lengths,
    data and rates); refuse where the trained tensors or the checkpoint would not fit the new text."""
    if not resume:
        raise user_error("E0532", f"{run_dir} holds a run whose stage schedule differs from this spec",
                         help="pass --resume to continue it under the new schedule, or choose a new --output "
                         "folder")
    old_names = [s["name"] for s in manifest["stages"]]
    new_names = [s.name for s in stages]
    if old_names != new_names:
        raise user_error("E0536", f"{run_dir}: the stages changed ({', '.join(old_names)} -> "
                         f"{', '.join(new_names)}); a run resumes the schedule it began with",
                         help="put the stages back as they were, or start a new --output folder")
    for entry, stage in zip(manifest["stages"], stages, strict=True):
        changes = stage_changes(entry.get("definition", {}), stage)
        if not changes:
            continue
        state = entry["state"]
        ckpt = (run_dir / entry["output"]).parent / "ckpt" / "state.json"
        fixed = [k for k in changes if not k.startswith(SCHEDULE_ONLY)]
        if state == "done" or (state == "running" and ckpt.is_file() and fixed):
            why = "is done" if state == "done" else f"is in progress and {', '.join(fixed)} changed"
            raise user_error("E0537", f"stage `{stage.name}` {why}: {_show(changes)}",
                             help="its trained tensors (or its checkpoint) follow the old definition: put it "
                             "back, or start a new --output folder")
        log(f"stage {stage.name}: {_show(changes)}")
        entry["definition"] = stage.model_dump(mode="json")


"""What a user sees while a run trains (a header per stage, a progress bar or plain lines), and metrics.jsonl."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.stage import Stage
from vlmspec.fsutil import atomic_write_text


def append_metric(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir: Path, stage: str, step: int) -> None:
    """Drop rows a resumed stage will write again (those past its checkpoint)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keep = [r for r in rows if not (r["stage"] == stage and r["step"] > step)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def stage_header(analysis: Analysis, stage: Stage, index: int, n_samples: int, upcycled: bool) -> str:
    from vlmspec.compiler.summary import human

    plan = analysis.plans[index]
    parts = []
    for name, status in plan.status.items():
        if status == "empty":
            continue
        count = plan.trainable.get(name, 0)
        parts.append(f"{name}: {status}" + (f" ({human(count)})" if count else ""))
    lora = f", LoRA {human(plan.lora_params)}" if plan.lora_params else ""
    return (f"== stage {index + 1}/{len(analysis.ir.stages)} `{stage.name}`: {', '.join(parts)}; "
             f"trainable {human(plan.total_trainable)}{lora}; {n_samples} samples, batch {stage.batch}, "
             f"{stage.optim.to_vlm()}, {stage.precision}" + ("; experts up-cycled from the dense FFN" if upcycled else ""))


def progress_bar(name: str, total: int, start: int, log: Callable[[str], None]) -> Callable[..., None]:
    """`update(step, loss, tokens_per_s)`, then `update(None, None, None)` at the end."""
    if not sys.stderr.isatty():
        last = [0.0]

        def plain(step, loss, tps):
            if step is None:
                return
            now = time.perf_counter()
            if step == total or now - last[0] > 5:
                last[0] = now
                log(f"  {name} step {step}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s")

        return plain
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                    TimeRemainingColumn(), transient=False)
    task = prog.add_task(name, total=total, completed=start, loss="-", tps="-")
    prog.start()

    def update(step, loss, tps):
        if step is None:
            prog.stop()
            return
        prog.update(task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")

    return update

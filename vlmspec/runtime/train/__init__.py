"""`vlm train`: the stage schedule a spec declares, run exactly (the run folder: see `loop`).

One module per job: `loop` (the run and each stage's steps), `optimisation` (parameter groups,
optimizers, schedules), `distribution` (ranks, DDP / FSDP2), `state` (tensors and resumable
checkpoints), `manifest` (what a run folder records; a changed schedule taken up on resume),
`stage_data` (a stage's data, read and encoded before any stage trains), `loader` (its images, read in
worker processes in the stage's seeded order), `progress` (what the user sees, metrics.jsonl); and what
a stage trains: `freeze`, `lora`, `objectives`.
"""

from vlmspec.runtime.train.loop import StageResult, Trainer, TrainOptions

__all__ = ["StageResult", "TrainOptions", "Trainer"]

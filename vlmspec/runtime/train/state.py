"""Tensors in and out of a run folder: what a stage changed, resumable checkpoints, RNG state.

Every file is written aside and renamed into place, so a run killed at any moment resumes (`--resume`) to
bitwise the same parameters.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from vlmspec.diagnostics import user_error
from vlmspec.fsutil import fsync_dir_files, replace_dir
from vlmspec.runtime.checkpoint import load_state, save_state


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def check_known(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise user_error("E0530", f"{what} holds {len(unknown)} tensors this model does not have, e.g. {unknown[0]}",
                         help="was the run folder made with another spec? start a new --output folder")


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    check_known(own, tensors, what)
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise user_error("E0530", f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)


def load_file_into(model: torch.nn.Module, path: Path, what: str) -> None:
    load_into(model, load_state(path), what)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict as plain tensors; sharded (DTensor) entries are all-gathered (collective)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def gather_fsdp_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trained tensors, optimizer state) of an FSDP2-sharded model, unsharded on rank 0 (empty elsewhere);
    a collective every rank must call. Optimizer state is keyed by parameter name, so it loads back into
    any sharding of the same model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model, options=full).items() if k in names}
    return weights, get_optimizer_state_dict(model, optim, options=full)


def rng_state() -> dict[str, Any]:
    """The generators dropout and sampling draw from: torch's CPU one, each GPU's (dropout on CUDA draws
    from those), and Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(ckpt: Path, weights: dict[str, torch.Tensor], optim_state: dict[str, Any],
                     sched: torch.optim.lr_scheduler.LRScheduler, step: int, losses: list[float]) -> None:
    """Trained tensors, optimizer / scheduler / RNG state and the step, written aside then renamed into place."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(tmp / "weights.safetensors", weights)
    torch.save({"optim": optim_state, "sched": sched.state_dict(), "rng": rng_state()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    fsync_dir_files(tmp)
    replace_dir(tmp, ckpt)


def restore_checkpoint(model: torch.nn.Module, optim: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LambdaLR, ckpt: Path, sharded: bool) -> dict[str, Any]:
    """Load a checkpoint written by `write_checkpoint` into the (possibly FSDP-sharded) model and optimizer.

    Rates set since the checkpoint (a schedule taken up on resume) hold from here on."""
    fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optim.param_groups]
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_state(ckpt / "weights.safetensors")
    blob = torch.load(ckpt / "optim.pt", weights_only=False, map_location="cpu")  # the optimizer moves it back
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        check_known(model.state_dict(), weights, "checkpoint")
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optim, blob["optim"], options=full)
    else:
        load_into(model, weights, "checkpoint")
        optim.load_state_dict(blob["optim"])
    sched.load_state_dict(blob["sched"])
    if fresh != [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optim.param_groups]:
        # the schedule changed since the checkpoint (`manifest.take_up_schedule`): the new rates hold from here
        for group, new in zip(optim.param_groups, fresh, strict=True):
            group.update(new)
        sched.base_lrs = [g["initial_lr"] for g in optim.param_groups]
        for group, base, factor in zip(optim.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)
    set_rng_state(blob["rng"])
    return state

"""`vlm train`: run the stage schedule a spec declares, exactly, on one process or many (torchrun).

A run folder is the typed hand-off between stages, never a name to parse:

    RUN_DIR/run.json                    manifest: spec, model, stages and their state, outputs
    RUN_DIR/init.safetensors            the weights every stage starts from (seeded init or loaded)
    RUN_DIR/stages/NN-NAME/weights.safetensors   what stage NN changed (its trainable tensors)
    RUN_DIR/stages/NN-NAME/ckpt/        in-progress checkpoint: weights, optimizer, scheduler, RNG, data position
    RUN_DIR/metrics.jsonl               one line per optimizer step
    RUN_DIR/final/                      a model folder `vlmspec.load` and `vlm generate` take

Stage k starts from init + the outputs of stages 1..k-1, applied in order. Every file is written
atomically, so a run killed at any moment resumes (`--resume`) to bitwise the same parameters.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import user_error
from vlmspec.fsutil import atomic_write_text, fsync_dir_files, replace_dir
from vlmspec.runtime.data import Dataset, read_dataset
from vlmspec.runtime.model import label_targets
from vlmspec.runtime.objectives import FIRST_STAGE, FirstStageLoss, text_batch
from vlmspec.runtime.processor import IGNORE, Encoded, Processor
from vlmspec.runtime.session import Session
from vlmspec.runtime.spec_paths import ParamTable, expand_fusion, stage_rates

MANIFEST_VERSION = 1


@dataclass(slots=True)
class TrainOptions:
    run_dir: Path
    data: str | None = None  # a data file, or a folder the stages' `data` paths are relative to
    images: str | None = None
    stages: list[str] | None = None  # None: every stage, in order
    resume: bool = False
    max_bad: int = 0
    micro_batch: int | None = None
    save_every: int = 50
    steps: int | None = None  # override every stage's length (smoke tests)
    tokenizer: str | None = None
    fsdp: bool = False
    eval_data: str | None = None  # held-out VQA data scored with `vlm eval`'s code during training
    eval_every: int = 0  # optimizer steps between evaluations (0: at the end of each stage only)
    quiet: bool = False
    log: Callable[[str], None] = print


@dataclass(slots=True)
class StageResult:
    name: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- distributed


@dataclass(slots=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ---------------------------------------------------------------- manifest


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps(manifest, indent=2))


def spec_hash(analysis: Analysis) -> str:
    import hashlib

    return hashlib.sha256(analysis.ir.model_dump_json().encode()).hexdigest()[:16]


def architecture_hash(analysis: Analysis) -> str:
    """The spec without its stage schedule: what a run's tensors are tied to."""
    import hashlib

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


# ---------------------------------------------------------------- weights


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from vlmspec.runtime.checkpoint import save_state

    save_state(path, tensors)


def load_file(path: str) -> dict[str, torch.Tensor]:
    from vlmspec.runtime.checkpoint import load_state

    return load_state(path)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _check_known(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise user_error("E0530", f"{what} holds {len(unknown)} tensors this model does not have, e.g. {unknown[0]}",
                         help="was the run folder made with another spec? start a new --output folder")


def _load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    _check_known(own, tensors, what)
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise user_error("E0530", f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)


def _gather_fsdp_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> tuple[dict, dict]:
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


# ---------------------------------------------------------------- data


@dataclass(slots=True)
class Encodings:
    examples: list[Encoded]
    pixels: list[torch.Tensor | None]


@dataclass(slots=True)
class Prepared:
    """A stage's data, ready before any stage trains: first-stage objective weights, encoded samples,
    and (first stage) the caption token ids."""

    first: dict[str, float]
    enc: Encodings
    texts: list[list[int]]


def _stage_data(stage: Stage, opts: TrainOptions) -> tuple[str, str, str | None]:
    fmt = "auto"
    images = opts.images
    if stage.data is not None:
        path = stage.data.path
        fmt = stage.data.format
        images = stage.data.images or images
        if opts.data and Path(opts.data).is_dir() and not Path(path).is_absolute():
            path = str(Path(opts.data) / path)
            if images and not Path(images).is_absolute():
                images = str(Path(opts.data) / images)
    elif opts.data:
        path = opts.data
        if Path(path).is_dir():
            raise user_error("E0522", f"stage `{stage.name}` names no data file and --data is a folder",
                             help=f'add `data "FILE"` to stage `{stage.name}` or pass --data FILE')
    else:
        raise user_error("E0522", f"stage `{stage.name}` has no data", help="pass --data FILE or add `data \"FILE\"`")
    return path, fmt, images


def encode_dataset(ds: Dataset, processor: Processor) -> Encodings:
    needs_image = processor.transform is not None
    examples, pixels = [], []
    for s in ds.samples:
        n_images = 1 if (s.image is not None and needs_image) else 0
        examples.append(processor.encode_turns(s.turns, n_images))
        pixels.append(processor.transform(s.image) if n_images else None)
    return Encodings(examples, pixels)


# ---------------------------------------------------------------- optimisation


def _param_groups(model: torch.nn.Module, stage: Stage, analysis: Analysis, table: ParamTable) -> list[dict[str, Any]]:
    """One group per learning rate: a parameter takes the rate of the most specific path that sets one
    (`train llm, llm.attn(lr = 1e-5)`: the attention at 1e-5, the rest of `llm` at the optimizer's)."""
    rates = stage_rates(analysis, stage.name)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = table.rate(name, rates)
            groups.setdefault(stage.optim.lr if lr is None else lr, []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def make_optimizer(groups: list[dict[str, Any]], stage: Stage) -> torch.optim.Optimizer:
    o = stage.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def lr_lambda(stage: Stage, total: int) -> Callable[[int], float]:
    warm = int(round(stage.warmup * total))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if stage.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if stage.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


# ---------------------------------------------------------------- the run


class Trainer:
    def __init__(self, analysis: Analysis, opts: TrainOptions, spec_text: str, spec_ref: str):
        self.analysis = analysis
        self.opts = opts
        self.spec_text = spec_text
        self.spec_ref = spec_ref
        self.dist = Dist.from_env()
        self.run_dir = Path(opts.run_dir)
        self._sharded = False
        self._last_state: dict[str, torch.Tensor] = {}

    def log(self, msg: str) -> None:
        if self.dist.main and not self.opts.quiet:
            self.opts.log(msg)

    # ------------------------------------------------------------ setup
    def _tokenizer(self, all_stages: list[Stage]):
        """The run's tokenizer: the one saved in the run folder, else the given or spec-named one (with
        the spec's special tokens, as `vlm build` adds them), else a BPE trained on the stages' text."""
        from vlmspec.runtime.session import load_tokenizers, tokenizer_source
        from vlmspec.runtime.tokenizer import ensure_special_tokens, load_tokenizer, train_tokenizer

        saved = self.run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            return ensure_special_tokens(load_tokenizer(saved), self.analysis)
        lm = self.analysis.ir.language.config
        source = tokenizer_source(self.analysis, self.opts.tokenizer)
        if source is not None:
            tok, _ = load_tokenizers(self.analysis, source)
        else:
            texts = []
            for st in all_stages:
                path, fmt, images = _stage_data(st, self.opts)
                ds = read_dataset(path, fmt, images, needs_image=False)
                for s in ds.samples:
                    for q, a in s.turns:
                        texts.append(q)
                        texts.append(self.analysis.ir.settings.answer.replace("{a}", a))
            prompt = self.analysis.ir.settings.prompt.replace("{image}", "").replace("{q}", "")
            texts += [prompt] * 50
            extra = ["<image>", *self.analysis.ir.settings.task_tokens]
            fusions = self.analysis.ir.by_role("fusion")
            if fusions:
                extra.append(fusions[0].config.image_token)
            tok = ensure_special_tokens(train_tokenizer(texts, lm.vocab, extra_special=dict.fromkeys(extra)),
                                        self.analysis)
            self.log(f"trained a {len(tok)}-token BPE tokenizer on the training text (no tokenizer was given)")
        if self.dist.main:
            tok.save_pretrained(str(saved))
        return tok

    def _build(self, tokenizer) -> Session:
        """The model every stage starts from, built the one way every command builds it: the spec's
        `weights` loaded, `dtype` and `quantize` honoured, the rest seeded."""
        from vlmspec.runtime.session import build_session

        return build_session(self.analysis, tokenizer=tokenizer, seed=self._seed())

    def _seed(self) -> int:
        return self.analysis.ir.stages[0].seed if self.analysis.ir.stages else 0

    # ------------------------------------------------------------ main loop
    def run(self) -> list[StageResult]:
        stages = self.analysis.ir.stages
        if not stages:
            raise user_error("E0523", f"model `{self.analysis.ir.name}` declares no stage to train",
                             help="add e.g. `stage align { train proj  freeze clip, llm }`")
        if self.opts.stages:
            unknown = [s for s in self.opts.stages if s not in {st.name for st in stages}]
            if unknown:
                from vlmspec.diagnostics import did_you_mean

                raise user_error("E0524", f"no stage `{unknown[0]}` in model `{self.analysis.ir.name}`",
                                 help=did_you_mean(unknown[0], [s.name for s in stages]) or
                                 "stages: " + ", ".join(s.name for s in stages))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(self.run_dir)
        digest = spec_hash(self.analysis)
        if manifest is not None and manifest.get("spec_hash") != digest:
            if manifest.get("architecture_hash") != architecture_hash(self.analysis):
                raise user_error("E0531", f"{self.run_dir} holds a run of another architecture "
                                 f"(`{manifest.get('model')}`, spec hash {manifest.get('spec_hash')})",
                                 help="use a new --output folder")
            self._take_up_schedule(manifest, stages, digest)
        if manifest is not None and not self.opts.resume and any(s["state"] != "pending" for s in manifest["stages"]):
            wanted = self.opts.stages or [s.name for s in stages]
            if any(s["name"] in wanted and s["state"] != "pending" for s in manifest["stages"]):
                raise user_error("E0532", f"{self.run_dir} already holds trained stages",
                                 help="pass --resume to continue it, or choose a new --output folder")
        wanted_names = self.opts.stages or [s.name for s in stages]
        if manifest is None:
            manifest = {"version": MANIFEST_VERSION, "spec": self.spec_ref, "model": self.analysis.ir.name,
                        "spec_hash": digest, "architecture_hash": architecture_hash(self.analysis),
                        "stages": [{"name": s.name, "index": i + 1, "state": "pending",
                                    "output": f"stages/{i + 1:02d}-{s.name}/weights.safetensors",
                                    "definition": s.model_dump(mode="json")}
                                   for i, s in enumerate(stages)]}
            if self.dist.main:
                atomic_write_text(self.run_dir / "spec.vlm", self.spec_text)
                _write_manifest(self.run_dir, manifest)
        tokenizer = self._tokenizer(stages)
        self.dist.barrier()
        self._check_quantized()
        session = self._build(tokenizer)
        self.session = session
        if session.report is not None:
            self.log(str(session.report))
        processor, model = session.require_processor(), session.model
        model.train()
        prepared = {st.name: self._prepare(st, processor) for st in stages if st.name in wanted_names}
        init = self.run_dir / "init.safetensors"
        if init.is_file():
            _load_into(model, load_file(str(init)), "init.safetensors")
        elif self.dist.main:
            _save_tensors(init, model.state_dict())
        self.dist.barrier()
        results = []
        wanted = self.opts.stages or [s.name for s in stages]
        for i, stage in enumerate(stages):
            entry = manifest["stages"][i]
            out = self.run_dir / entry["output"]
            if stage.name not in wanted:
                if out.is_file():
                    _load_into(model, load_file(str(out)), entry["output"])
                continue
            if entry["state"] == "done" and out.is_file():
                self.log(f"stage {stage.name}: already done, loading {entry['output']}")
                _load_into(model, load_file(str(out)), entry["output"])
                continue
            if i > 0:
                prev = manifest["stages"][i - 1]
                if prev["state"] != "done" and stages[i - 1].name not in wanted:
                    self.log(f"note: stage {stage.name} starts without stage {prev['name']} (not trained)")
            entry["state"] = "running"
            if self.dist.main:
                _write_manifest(self.run_dir, manifest)
            result = self._train_stage(model, processor, stage, i, out.parent, prepared[stage.name])
            results.append(result)
            if self._sharded:
                # FSDP2 shards modules in place; continue from a plain model holding the gathered weights
                model = self._build(tokenizer).model
                model.train()
                _load_into(model, self._last_state, "the gathered FSDP state")
                self._sharded = False
            entry["state"] = "done"
            entry["steps"] = result.steps
            entry["final_loss"] = result.losses[-1] if result.losses else None
            if self.dist.main:
                _write_manifest(self.run_dir, manifest)
            self.dist.barrier()
        if self.dist.main:
            self._write_final(model, tokenizer, manifest)
        self.dist.barrier()
        return results

    def _take_up_schedule(self, manifest: dict[str, Any], stages: list[Stage], digest: str) -> None:
        """The spec changed only in its stage schedule since the run began: say what changed and carry on
        where that is sound (a pending stage takes any change; a stage in progress takes new lengths,
        data and rates); refuse where the trained tensors or the checkpoint would not fit the new text."""
        if not self.opts.resume:
            raise user_error("E0532", f"{self.run_dir} holds a run whose stage schedule differs from this spec",
                             help="pass --resume to continue it under the new schedule, or choose a new --output "
                             "folder")
        old_names = [s["name"] for s in manifest["stages"]]
        new_names = [s.name for s in stages]
        if old_names != new_names:
            raise user_error("E0536", f"{self.run_dir}: the stages changed ({', '.join(old_names)} -> "
                             f"{', '.join(new_names)}); a run resumes the schedule it began with",
                             help="put the stages back as they were, or start a new --output folder")
        for entry, stage in zip(manifest["stages"], stages, strict=True):
            changes = stage_changes(entry.get("definition", {}), stage)
            if not changes:
                continue
            state = entry["state"]
            ckpt = (self.run_dir / entry["output"]).parent / "ckpt" / "state.json"
            fixed = [k for k in changes if not k.startswith(SCHEDULE_ONLY)]
            if state == "done" or (state == "running" and ckpt.is_file() and fixed):
                why = "is done" if state == "done" else f"is in progress and {', '.join(fixed)} changed"
                raise user_error("E0537", f"stage `{stage.name}` {why}: {_show(changes)}",
                                 help="its trained tensors (or its checkpoint) follow the old definition: put it "
                                 "back, or start a new --output folder")
            self.log(f"stage {stage.name}: {_show(changes)}")
            entry["definition"] = stage.model_dump(mode="json")
        manifest["spec_hash"] = digest
        if self.dist.main:
            atomic_write_text(self.run_dir / "spec.vlm", self.spec_text)
            _write_manifest(self.run_dir, manifest)

    def _write_final(self, model, tokenizer, manifest) -> None:
        from vlmspec.runtime.checkpoint import save_model_dir

        save_model_dir(model, self.analysis, self.run_dir / "final", tokenizer=tokenizer, spec_text=self.spec_text,
                       state=model.state_dict(),
                       extra={"run": {"spec": manifest["spec"], "stages": [
                           {k: s.get(k) for k in ("name", "state", "steps", "final_loss")} for s in manifest["stages"]]}})
        self.log(f"final model: {self.run_dir / 'final'}  (vlm generate {self.run_dir / 'final'} --image ... "
                 "--prompt ...)")

    # ------------------------------------------------------------ one stage
    def _prepare(self, stage: Stage, processor: Processor) -> Prepared:
        """A stage's data read, checked and encoded: done for every stage before the first one trains,
        so a bad record in the last stage's data is reported in seconds, not after hours."""
        first = {o.name: o.weight for o in stage.objective if o.name in FIRST_STAGE}
        if first and len(first) != len(stage.objective):
            raise user_error("E0527", f"stage `{stage.name}` mixes `lm` with {', '.join(first)}",
                             help="BLIP-2 trains them in separate stages: `objective itc + itm + itg` first, "
                             "then a stage with `objective lm`")
        path, fmt, images = _stage_data(stage, self.opts)
        needs_image = processor.transform is not None
        ds = read_dataset(path, fmt, images, needs_image=needs_image, image_token="<image>")
        ds.check(self.opts.max_bad)
        if ds.bad:
            self.log(f"stage {stage.name}: skipped {len(ds.bad)} bad records (first: {ds.bad[0].where}: "
                     f"{ds.bad[0].reason})")
        if not ds.samples:
            raise user_error("E0525", f"stage `{stage.name}`: no usable records in {path}")
        enc = encode_dataset(ds, processor)
        texts = [processor.tokenizer(" ".join(a for _, a in smp.turns).strip(), add_special_tokens=False)["input_ids"]
                 for smp in ds.samples] if first else []
        return Prepared(first, enc, texts)

    def _check_quantized(self) -> None:
        """A component stored as integers (`quantize = int8`) cannot take gradients: refuse a stage that
        trains or adapts one, instead of training something else."""
        for plan in self.analysis.plans:
            for comp, status in plan.status.items():
                mode = getattr(self.analysis.ir.components[comp].config, "quantize", "none")
                if mode != "none" and status not in ("frozen", "empty"):
                    raise user_error("E0535", f"stage `{plan.name}` trains `{comp}`, which `quantize = {mode}` "
                                     "stores as integers", help=f"freeze `{comp}` in that stage, or drop `quantize` "
                                     "while training (quantize the trained model for serving)")

    def _train_stage(self, model, processor: Processor, stage: Stage, index: int, stage_dir: Path,
                     prepared: Prepared) -> StageResult:
        from vlmspec.runtime.freeze import apply_stage

        opts, dist = self.opts, self.dist
        first, enc, texts = prepared.first, prepared.enc, prepared.texts

        upcycle_done = self._upcycle(model, stage)
        lora_modules = self._apply_lora(model, stage)
        table = ParamTable.of(model, self.analysis)  # after LoRA: adapters lie under their layers' paths
        apply_stage(model, self.analysis, stage.name, table)
        for m in lora_modules:
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        self._print_header(stage, index, len(enc.examples), upcycle_done)

        accum = stage.grad_accum
        global_batch = stage.batch
        if global_batch % (accum * dist.world):
            raise user_error("E0526", f"stage `{stage.name}`: batch {global_batch} does not split into "
                             f"{accum} accumulation steps x {dist.world} processes")
        micro = global_batch // (accum * dist.world)
        if first and micro < 2 and first.keys() & {"itc", "itm"}:
            raise user_error("E0528", f"stage `{stage.name}`: itc / itm contrast the samples of a micro-batch, and "
                             f"batch {global_batch} leaves {micro} per micro-batch",
                             help=f"raise `batch` to at least {2 * accum * dist.world}")
        steps_per_epoch = max(1, len(enc.examples) // global_batch)
        total = opts.steps or stage.steps or steps_per_epoch * (stage.epochs or 1)

        # wrap first: FSDP2 replaces the parameters the optimizer must hold
        train_model = self._wrap(model, stage, table, FirstStageLoss(model, set(first)) if first else None)
        groups = _param_groups(model, stage, self.analysis, table)
        optim = make_optimizer(groups, stage)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(stage, total))
        ckpt = stage_dir / "ckpt"
        step = 0
        torch.manual_seed(stage.seed + 1000 * (index + 1))
        random.seed(stage.seed + index)
        result = StageResult(stage.name, 0)
        if opts.resume and (ckpt / "state.json").is_file():
            state = self._restore(model, optim, sched, ckpt)
            step = state["step"]
            result.losses = state.get("losses", [])
            self.log(f"stage {stage.name}: resumed at step {step}/{total}")
            self._truncate_metrics(stage.name, step)

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=stage.precision == "bf16")
        n = len(enc.examples)
        progress = self._progress(stage.name, total, step)
        t0 = time.perf_counter()
        tokens_seen = 0
        model.train()
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stage.seed * 7919 + epoch)).tolist()
            batch_ids = order[pos * global_batch:(pos + 1) * global_batch]
            if len(batch_ids) < global_batch:  # small data: wrap around
                batch_ids = (batch_ids + order)[:global_batch]
            mine = batch_ids[dist.rank::dist.world]
            micro_batches = [mine[j * micro:(j + 1) * micro] for j in range(accum)]
            n_tokens = 0
            for mb in micro_batches:
                n_tokens += sum(sum(1 for x in enc.examples[k].labels[1:] if x != IGNORE) for k in mb)
            total_tokens = int(dist.all_sum(torch.tensor(float(n_tokens))).item())
            optim.zero_grad(set_to_none=True)
            loss_acc = 0.0
            part_acc: dict[str, float] = {}
            for mb in micro_batches:
                pix = [enc.pixels[k] for k in mb]
                if first:
                    loss, parts = self._first_stage_step(train_model, processor, first, pix, [texts[k] for k in mb],
                                                         stage, autocast)
                    loss = loss / accum
                    loss.backward()
                    loss_acc += float(loss.detach())
                    for name, value in parts.items():
                        part_acc[name] = part_acc.get(name, 0.0) + value / accum
                    tokens_seen += sum(len(texts[k]) + 2 for k in mb)
                    continue
                pixels, aspect = processor.stack(pix) if pix and pix[0] is not None else (None, None)
                batch = processor.training_batch([enc.examples[k] for k in mb], pixels, aspect)
                labels = batch.pop("labels")
                with autocast:  # logits only where a target is: the head's matmul and softmax shrink
                    out = train_model(**batch, labels=labels, logits_for="labels")
                # summed, then divided by the optimizer step's global token count: accumulation and data
                # parallelism then give exactly the gradients of one big batch
                _, targets = label_targets(labels)
                loss_sum = F.cross_entropy(out.logits.float(), targets.to(out.logits.device), reduction="sum")
                loss = loss_sum * dist.world / max(1, total_tokens)
                aux = getattr(out, "aux_loss", None)
                if aux is not None:
                    loss = loss + aux / accum
                loss.backward()
                loss_acc += float(loss_sum.detach()) / max(1, total_tokens)
                tokens_seen += int(batch["attention_mask"].sum())
            # lm: already divided by the global token count; first-stage losses: the mean over processes
            loss_global = float(dist.all_sum(torch.tensor(loss_acc * 1.0)).item()) / (dist.world if first else 1)
            parts_global = {k: float(dist.all_sum(torch.tensor(v)).item()) / dist.world for k, v in part_acc.items()}
            if stage.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], stage.clip_grad)
            optim.step()
            sched.step()
            step += 1
            result.losses.append(loss_global)
            elapsed = time.perf_counter() - t0
            if dist.main:
                self._metric({"stage": stage.name, "step": step, "loss": loss_global, **parts_global,
                              "lr": sched.get_last_lr()[0], "tokens_per_s": tokens_seen * dist.world / max(elapsed, 1e-9)})
            progress(step, loss_global, tokens_seen * dist.world / max(elapsed, 1e-9))
            if opts.eval_data and opts.eval_every and step % opts.eval_every == 0 and step < total:
                self._evaluate(model, processor, stage.name, step)
            if step % opts.save_every == 0 and step < total:
                self._checkpoint(model, optim, sched, ckpt, step, result.losses)
        progress(None, None, None)
        if opts.eval_data:
            self._evaluate(model, processor, stage.name, step)
        result.steps = step
        result.seconds = time.perf_counter() - t0
        self._merge_lora(model, lora_modules)
        state = self._full_state(model)  # every rank takes part: FSDP gathers its shards here
        self._last_state = state
        if dist.main:
            _save_tensors(stage_dir / "weights.safetensors", self._changed_state(model, stage, state, table))
            if ckpt.exists():
                shutil.rmtree(ckpt, ignore_errors=True)
        self.dist.barrier()
        return result

    def _first_stage_step(self, train_model, processor: Processor, first: dict[str, float], pix: list,
                          texts: list[list[int]], stage: Stage, autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch of BLIP-2's first-stage objectives: (weighted loss, each loss as a float)."""
        if not pix or pix[0] is None:
            raise user_error("E0528", f"stage `{stage.name}`: itc / itm / itg need an image with every sample")
        loss_module = train_model.module if hasattr(train_model, "module") else train_model  # under DDP
        words, positions = loss_module.model.components[loss_module.qformer_name].word_table()
        bos = processor.bos_id if processor.bos_id is not None else processor.pad_id
        eos = processor.eos_id if processor.eos_id is not None else processor.pad_id
        text = text_batch(texts, bos, eos, positions.num_embeddings, words.num_embeddings, f"stage `{stage.name}`")
        with autocast:
            losses = train_model(processor.stack(pix)[0], text.ids, text.mask)
        total = sum(first[name] * value for name, value in losses.items())
        return total, {name: float(value.detach()) for name, value in losses.items()}

    def _full_state(self, model) -> dict[str, torch.Tensor]:
        """The whole state dict as plain tensors; sharded (DTensor) entries are all-gathered (collective)."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}

    def _changed_state(self, model, stage: Stage, state: dict[str, torch.Tensor],
                       table: ParamTable) -> dict[str, torch.Tensor]:
        """Tensors a stage may have changed: its trainable parameters, plus every parameter under the
        paths whose LoRA adapters were merged or whose experts were up-cycled (frozen by then)."""
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        merged = ParamTable.of(model, self.analysis) if stage.lora else table  # names without the adapters
        for path in [p for lo in stage.lora for p in expand_fusion(lo.path, self.analysis)] + \
                [p for u in stage.upcycle for p in expand_fusion(u.dest, self.analysis)]:
            names.update(merged.covered(path))
        return {k: v for k, v in state.items() if k in names}

    def _wrap(self, model, stage: Stage, table: ParamTable, loss_module: torch.nn.Module | None = None):
        """What the training loop calls: the model, or `loss_module` (which computes the stage's losses
        from the model), under DDP or with the model's trained components sharded by FSDP2."""
        top = loss_module if loss_module is not None else model
        if self.dist.world <= 1:
            return top
        if self.opts.fsdp or stage.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (self.dist.world,))
            trained = table.components_with(n for n, p in model.named_parameters() if p.requires_grad)
            for name in sorted(trained):  # frozen components stay replicated
                fully_shard(model.components[name], mesh=mesh)
            self._sharded = True
            return top
        from torch.nn.parallel import DistributedDataParallel as DDP

        # a subset of the first-stage objectives leaves heads unused (itc alone never reaches the ITM head)
        unused = loss_module is not None and set(FIRST_STAGE) - loss_module.wanted
        return DDP(top, find_unused_parameters=bool(unused))

    def _checkpoint(self, model, optim, sched, ckpt: Path, step: int, losses: list[float]) -> None:
        """Trained tensors, optimizer / scheduler / RNG state and the step, written aside then renamed
        into place. Under FSDP2 every rank takes part in gathering the full (unsharded) state first."""
        if self._sharded:
            weights, optim_state = _gather_fsdp_state(model, optim)
        else:
            weights, optim_state = (trainable_state(model), optim.state_dict()) if self.dist.main else ({}, {})
        if not self.dist.main:
            return
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_tensors(tmp / "weights.safetensors", weights)
        torch.save({"optim": optim_state, "sched": sched.state_dict(), "rng": _rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
        fsync_dir_files(tmp)
        replace_dir(tmp, ckpt)

    def _restore(self, model, optim, sched, ckpt: Path) -> dict[str, Any]:
        """Load a checkpoint written by `_checkpoint` into the (possibly FSDP-sharded) model and optimizer."""
        fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optim.param_groups]
        state = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "weights.safetensors"))
        blob = torch.load(ckpt / "optim.pt", weights_only=False)
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            _check_known(model.state_dict(), weights, "checkpoint")
            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, weights, options=full)
            set_optimizer_state_dict(model, optim, blob["optim"], options=full)
        else:
            _load_into(model, weights, "checkpoint")
            optim.load_state_dict(blob["optim"])
        sched.load_state_dict(blob["sched"])
        if fresh != [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optim.param_groups]:
            # the schedule changed since the checkpoint (`_take_up_schedule`): the new rates hold from here
            for group, new in zip(optim.param_groups, fresh, strict=True):
                group.update(new)
            sched.base_lrs = [g["initial_lr"] for g in optim.param_groups]
            for group, base, factor in zip(optim.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * factor(sched.last_epoch)
        _set_rng_state(blob["rng"])
        return state

    def _evaluate(self, model, processor: Processor, stage: str, step: int) -> None:
        """Held-out VQA accuracy with the evaluation code `vlm eval` runs, so the two always agree."""
        if self.dist.main:
            from vlmspec.evaluation import run_eval

            session = Session(self.analysis, model, processor.tokenizer, processor.instruction_tokenizer)
            was_training = model.training
            model.eval()
            try:
                results = run_eval(session, "vqa", self.opts.eval_data, progress=False)
            finally:
                model.train(was_training)
            acc = results["metrics"]["vqa_accuracy"]
            self._metric({"stage": stage, "step": step, "eval": "vqa", "vqa_accuracy": acc,
                          "questions": results["metrics"].get("questions")})
            self.log(f"  {stage} step {step}: held-out VQA accuracy {acc:.1f}%")
        self.dist.barrier()

    def _metric(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, stage: str, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file() or not self.dist.main:
            return
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if not (r["stage"] == stage and r["step"] > step)]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------ LoRA and up-cycling
    def _apply_lora(self, model, stage: Stage) -> list[torch.nn.Module]:
        if not stage.lora:
            return []
        from vlmspec.runtime.lora import inject_lora

        return inject_lora(model, self.analysis, stage)

    def _merge_lora(self, model, modules: list[torch.nn.Module]) -> None:
        if modules:
            from vlmspec.runtime.lora import merge_lora

            merge_lora(model)

    def _upcycle(self, model, stage: Stage) -> bool:
        if not stage.upcycle:
            return False
        from vlmspec.runtime.model import upcycle

        upcycle(model)
        return True

    # ------------------------------------------------------------ experience
    def _print_header(self, stage: Stage, index: int, n_samples: int, upcycled: bool) -> None:
        if not self.dist.main or self.opts.quiet:
            return
        from vlmspec.compiler.summary import human

        plan = self.analysis.plans[index]
        parts = []
        for name, status in plan.status.items():
            if status == "empty":
                continue
            count = plan.trainable.get(name, 0)
            parts.append(f"{name}: {status}" + (f" ({human(count)})" if count else ""))
        lora = f", LoRA {human(plan.lora_params)}" if plan.lora_params else ""
        self.log(f"== stage {index + 1}/{len(self.analysis.ir.stages)} `{stage.name}`: {', '.join(parts)}; "
                 f"trainable {human(plan.total_trainable)}{lora}; {n_samples} samples, batch {stage.batch}, "
                 f"{stage.optim.to_vlm()}, {stage.precision}" + ("; experts up-cycled from the dense FFN" if upcycled else ""))

    def _progress(self, name: str, total: int, start: int):
        if not self.dist.main or self.opts.quiet:
            return lambda *a: None
        if not sys.stderr.isatty():
            last = [0.0]

            def plain(step, loss, tps):
                if step is None:
                    return
                now = time.perf_counter()
                if step == total or now - last[0] > 5:
                    last[0] = now
                    self.opts.log(f"  {name} step {step}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s")

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

"""`vlm train`'s run: the stage schedule a spec declares, exactly, on one process or many (torchrun).

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

import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmspec.compiler.compile import Analysis
from vlmspec.compiler.schema.stage import Stage
from vlmspec.diagnostics import did_you_mean, user_error
from vlmspec.fsutil import atomic_write_text
from vlmspec.runtime.checkpoint import save_model_dir, save_state
from vlmspec.runtime.devices import autocast, grad_scaler, move, resolve_device
from vlmspec.runtime.inputs.data import read_dataset
from vlmspec.runtime.inputs.processor import IGNORE, Processor
from vlmspec.runtime.inputs.tokenizer import (
    byte_tokenizer,
    ensure_special_tokens,
    load_tokenizer,
    train_tokenizer,
)
from vlmspec.runtime.model import VisionLanguageModel, label_targets, upcycle
from vlmspec.runtime.session import (
    Session,
    build_session,
    load_tokenizers,
    template_markers,
    text_tower_tokenizer,
    tokenizer_source,
)
from vlmspec.runtime.spec_paths import ParamTable, expand_fusion
from vlmspec.runtime.train import contrastive_stage
from vlmspec.runtime.train.activations import checkpointing
from vlmspec.runtime.train.audio_items import audio_config, audio_training_batch, is_audio_batch
from vlmspec.runtime.train.distribution import Dist, wrap
from vlmspec.runtime.train.freeze import apply_stage
from vlmspec.runtime.train.loader import DataOrder, StageBatches, default_workers
from vlmspec.runtime.train.manifest import (
    architecture_hash,
    new_manifest,
    read_manifest,
    spec_hash,
    take_up_schedule,
    write_manifest,
)
from vlmspec.runtime.train.objectives import FIRST_STAGE, FirstStageLoss, text_batch
from vlmspec.runtime.train.optimisation import lr_lambda, make_optimizer, param_groups
from vlmspec.runtime.train.packing import PackStats, pack_stats, packed_batch, packed_layout
from vlmspec.runtime.train.progress import append_metric, progress_bar, stage_header, truncate_metrics
from vlmspec.runtime.train.stage_data import Prepared, encode_dataset, stage_data
from vlmspec.runtime.train.state import (
    full_state,
    gather_fsdp_state,
    load_file_into,
    load_into,
    restore_checkpoint,
    trainable_state,
    write_checkpoint,
)
from vlmspec.runtime.train.video_items import is_video_batch, video_training_batch


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
    workers: int | None = None  # image-reading worker processes (0: on the training process; None: `default_workers`)
    device: str = "auto"  # `auto` (the local rank's GPU when there is one), `cpu` or `cuda`
    quiet: bool = False
    log: Callable[[str], None] = print


@dataclass(slots=True)
class StageResult:
    name: str
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


#: the held-out task's headline metric, and how the log names it
HELD_OUT_METRIC = {"vqa": ("vqa_accuracy", "VQA accuracy"), "video_qa": ("video_qa_accuracy", "video QA accuracy"),
                   "grounding": ("grounding_accuracy", "grounding accuracy (IoU >= 0.5)"),
                   "zero_shot": ("zero_shot_accuracy", "zero-shot accuracy"),
                   "retrieval": ("i2t_r1", "image-to-text recall@1")}


def held_out_task(path: str, analysis: Analysis | None = None) -> str:
    """The `vlm eval` task the held-out records ask for (`evaluation.formats.task_of_records`). With the model's
    analysis, a task it cannot be scored on is refused here, before any training (a contrastive model
    generates no answers; a model without `boxes` writes none)."""
    from vlmspec.evaluation.formats import task_of_records

    task = task_of_records(path)
    if analysis is None:
        return task
    contrastive = analysis.ir.language is None
    if contrastive and task not in ("zero_shot", "retrieval"):
        raise user_error("E0615", f"--eval {path}: its records ask for {task}, which needs a language model, and "
                         "this is a contrastive (CLIP / SigLIP) model", help="hold out zero-shot records (`image`, "
                         "`label`: `vlm data synth` writes test_zero_shot.jsonl) or captions for retrieval")
    if not contrastive and task == "zero_shot":
        raise user_error("E0619", f"--eval {path}: zero-shot records need a contrastive (CLIP / SigLIP) model",
                         help="hold out VQA records (`image`, `question`, `answers`) instead")
    if task == "grounding" and analysis.ir.settings.boxes is None:
        raise user_error("E0627", f"--eval {path}: grounding records are scored by the boxes the model writes, and "
                         f"model `{analysis.ir.name}` declares no box format", help="add `boxes = coordinates(...)` "
                         "or `boxes = patch_index(...)` to the spec")
    return task


class Trainer:
    def __init__(self, analysis: Analysis, opts: TrainOptions, spec_text: str, spec_ref: str):
        self.analysis = analysis
        self.opts = opts
        self.spec_text = spec_text
        self.spec_ref = spec_ref
        self.device = resolve_device(opts.device)
        self.dist = Dist.from_env(self.device)
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
        saved = self.run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            return ensure_special_tokens(load_tokenizer(saved), self.analysis)
        source = tokenizer_source(self.analysis, self.opts.tokenizer)
        if source is not None:
            tok, _ = load_tokenizers(self.analysis, source)
        elif self.analysis.ir.language is None:  # a contrastive model: its text tower reads the built-in bytes
            tok = text_tower_tokenizer(self.analysis)[0] or byte_tokenizer(())  # (too few rows: E0617 names them)
            self.log("text tower: the built-in byte-level tokenizer (no tokenizer was given)")
        else:
            lm = self.analysis.ir.language.config
            texts = []
            for st in all_stages:
                path, fmt, images = stage_data(st, self.opts.data, self.opts.images)
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
            extra += template_markers(self.analysis)  # `<|im_end|>` one token, as the checkpoint's tokenizer has it
            tok = ensure_special_tokens(train_tokenizer(texts, lm.vocab, extra_special=dict.fromkeys(extra)),
                                        self.analysis)
            self.log(f"trained a {len(tok)}-token BPE tokenizer on the training text (no tokenizer was given)")
        if self.dist.main:
            tok.save_pretrained(str(saved))
        return tok

    def _build(self, tokenizer) -> Session:
        """The model every stage starts from, built the one way every command builds it: the spec's
        `weights` loaded, `dtype` and `quantize` honoured, the rest seeded."""
        return build_session(self.analysis, tokenizer=tokenizer, seed=self._seed(), device=str(self.device))

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
                raise user_error("E0524", f"no stage `{unknown[0]}` in model `{self.analysis.ir.name}`",
                                 help=did_you_mean(unknown[0], [s.name for s in stages]) or
                                 "stages: " + ", ".join(s.name for s in stages))
        if self.opts.eval_data:
            held_out_task(self.opts.eval_data, self.analysis)  # a task this model cannot be scored on: now, not after
        self.run_dir.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.run_dir)
        digest = spec_hash(self.analysis)
        if manifest is not None and manifest.get("spec_hash") != digest:
            if manifest.get("architecture_hash") != architecture_hash(self.analysis):
                raise user_error("E0531", f"{self.run_dir} holds a run of another architecture "
                                 f"(`{manifest.get('model')}`, spec hash {manifest.get('spec_hash')})",
                                 help="use a new --output folder")
            take_up_schedule(self.run_dir, manifest, stages, resume=self.opts.resume, log=self.log)
            manifest["spec_hash"] = digest
            if self.dist.main:
                atomic_write_text(self.run_dir / "spec.vlm", self.spec_text)
                write_manifest(self.run_dir, manifest)
        if manifest is not None and not self.opts.resume and any(s["state"] != "pending" for s in manifest["stages"]):
            wanted = self.opts.stages or [s.name for s in stages]
            if any(s["name"] in wanted and s["state"] != "pending" for s in manifest["stages"]):
                raise user_error("E0532", f"{self.run_dir} already holds trained stages",
                                 help="pass --resume to continue it, or choose a new --output folder")
        wanted_names = self.opts.stages or [s.name for s in stages]
        if manifest is None:
            manifest = new_manifest(self.analysis, self.spec_ref)
            if self.dist.main:
                atomic_write_text(self.run_dir / "spec.vlm", self.spec_text)
                write_manifest(self.run_dir, manifest)
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
            load_file_into(model, init, "init.safetensors")
        elif self.dist.main:
            save_state(init, model.state_dict())
        self.dist.barrier()
        results = []
        wanted = self.opts.stages or [s.name for s in stages]
        for i, stage in enumerate(stages):
            entry = manifest["stages"][i]
            out = self.run_dir / entry["output"]
            if stage.name not in wanted:
                if out.is_file():
                    load_file_into(model, out, entry["output"])
                continue
            if entry["state"] == "done" and out.is_file():
                self.log(f"stage {stage.name}: already done, loading {entry['output']}")
                load_file_into(model, out, entry["output"])
                continue
            if i > 0:
                prev = manifest["stages"][i - 1]
                if prev["state"] != "done" and stages[i - 1].name not in wanted:
                    self.log(f"note: stage {stage.name} starts without stage {prev['name']} (not trained)")
            entry["state"] = "running"
            if self.dist.main:
                write_manifest(self.run_dir, manifest)
            result = self._train_stage(model, processor, stage, i, out.parent, prepared[stage.name])
            results.append(result)
            if self._sharded:
                # FSDP2 shards modules in place; continue from a plain model holding the gathered weights
                model = self._build(tokenizer).model
                model.train()
                load_into(model, self._last_state, "the gathered FSDP state")
                self._sharded = False
            entry["state"] = "done"
            entry["steps"] = result.steps
            entry["final_loss"] = result.losses[-1] if result.losses else None
            if self.dist.main:
                write_manifest(self.run_dir, manifest)
            self.dist.barrier()
        if self.dist.main:
            self._write_final(model, tokenizer, manifest)
        self.dist.barrier()
        return results

    def _write_final(self, model: VisionLanguageModel, tokenizer, manifest) -> None:
        save_model_dir(model, self.analysis, self.run_dir / "final", tokenizer=tokenizer, spec_text=self.spec_text,
                       state=model.state_dict(),
                       extra={"run": {"spec": manifest["spec"], "stages": [
                           {k: s.get(k) for k in ("name", "state", "steps", "final_loss")} for s in manifest["stages"]]}})
        if self.analysis.ir.language is None:
            self.log(f"final model: {self.run_dir / 'final'}  (vlm eval {self.run_dir / 'final'} --task zero_shot ...)")
            return
        medium = "--audio" if audio_config(self.analysis) is not None else "--image"
        self.log(f"final model: {self.run_dir / 'final'}  (vlm generate {self.run_dir / 'final'} {medium} ... "
                 "--prompt ...)")

    # ------------------------------------------------------------ one stage
    def _prepare(self, stage: Stage, processor: Processor) -> Prepared:
        """A stage's data read, checked and encoded: done for every stage before the first one trains,
        so a bad record in the last stage's data is reported in seconds, not after hours."""
        if self.analysis.ir.language is None:  # `objective contrastive` (the compiler allows no other here)
            path, fmt, images = stage_data(stage, self.opts.data, self.opts.images)
            ds = read_dataset(path, fmt, images, needs_image=True)
            ds.check(self.opts.max_bad)
            if not ds.samples:
                raise user_error("E0525", f"stage `{stage.name}`: no usable records in {path}")
            return contrastive_stage.prepare(ds, processor)
        first = {o.name: o.weight for o in stage.objective if o.name in FIRST_STAGE}
        if first and len(first) != len(stage.objective):
            raise user_error("E0527", f"stage `{stage.name}` mixes `lm` with {', '.join(first)}",
                             help="BLIP-2 trains them in separate stages: `objective itc + itm + itg` first, "
                             "then a stage with `objective lm`")
        path, fmt, images = stage_data(stage, self.opts.data, self.opts.images)
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

    def _train_stage(self, model: VisionLanguageModel, processor: Processor, stage: Stage, index: int, stage_dir: Path,
                     prepared: Prepared) -> StageResult:
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
        self.log(stage_header(self.analysis, stage, index, len(enc.examples), upcycle_done))

        accum = stage.grad_accum
        global_batch = stage.batch
        if global_batch % (accum * dist.world):
            raise user_error("E0526", f"stage `{stage.name}`: batch {global_batch} does not split into "
                             f"{accum} accumulation steps x {dist.world} processes")
        micro = global_batch // (accum * dist.world)
        contrastive = contrastive_stage.CONTRASTIVE in first
        if contrastive:
            contrastive_stage.check_micro_batch(stage, micro, accum, dist.world)
        if first and micro < 2 and first.keys() & {"itc", "itm"}:
            raise user_error("E0528", f"stage `{stage.name}`: itc / itm contrast the samples of a micro-batch, and "
                             f"batch {global_batch} leaves {micro} per micro-batch",
                             help=f"raise `batch` to at least {2 * accum * dist.world}")
        steps_per_epoch = max(1, len(enc.examples) // global_batch)
        total = opts.steps or stage.steps or steps_per_epoch * (stage.epochs or 1)

        # wrap first: FSDP2 replaces the parameters the optimizer must hold
        loss_module = contrastive_stage.ContrastiveLoss(model) if contrastive else \
            FirstStageLoss(model, set(first)) if first else None
        train_model, self._sharded = wrap(model, dist, opts.fsdp or stage.fsdp, table, loss_module)
        groups = param_groups(model, stage, self.analysis, table)
        optim = make_optimizer(groups, stage)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(stage, total))
        ckpt = stage_dir / "ckpt"
        step = 0
        torch.manual_seed(stage.seed + 1000 * (index + 1))
        random.seed(stage.seed + index)
        result = StageResult(stage.name, 0)
        if opts.resume and (ckpt / "state.json").is_file():
            state = restore_checkpoint(model, optim, sched, ckpt, self._sharded)
            step = state["step"]
            result.losses = state.get("losses", [])
            self.log(f"stage {stage.name}: resumed at step {step}/{total}")
            if dist.main:
                truncate_metrics(self.run_dir, stage.name, step)

        precision = autocast(self.device, stage.precision)
        scaler = grad_scaler(self.device, stage.precision)
        n = len(enc.examples)
        progress = progress_bar(stage.name, total, step, opts.log) if dist.main and not opts.quiet else \
            (lambda *a: None)
        t0 = time.perf_counter()
        tokens_seen = 0
        model.train()
        checkpointed = self.analysis.plans[index].checkpointed
        if checkpointed:
            self.log(f"  activation checkpointing: {', '.join(checkpointed)} (blocks recomputed in the backward pass)")
        order = DataOrder(n, global_batch, steps_per_epoch, stage.seed, accum, micro, dist.rank, dist.world)
        workers = default_workers() if opts.workers is None else opts.workers
        on_cuda = any(p.is_cuda for p in model.parameters())
        packing = PackStats()
        with checkpointing(model.components, checkpointed), \
                StageBatches(enc.pixels, order, step, total, workers, pin_memory=on_cuda) as loader:
            while step < total:
                micro_batches = order.micro_batches(step)
                n_tokens = 0
                for mb in micro_batches:
                    n_tokens += sum(sum(1 for x in enc.examples[k].labels[1:] if x != IGNORE) for k in mb)
                total_tokens = int(dist.all_sum(torch.tensor(float(n_tokens))).item())
                optim.zero_grad(set_to_none=True)
                loss_acc = 0.0
                part_acc: dict[str, float] = {}
                step_pack = PackStats()
                for mb in micro_batches:
                    pix = loader.next(mb)
                    if first:
                        loss, parts = self._first_stage_step(train_model, processor, first, pix, [texts[k] for k in mb],
                                                             stage, precision)
                        loss = loss / accum
                        scaler.scale(loss).backward()
                        loss_acc += float(loss.detach())
                        for name, value in parts.items():
                            part_acc[name] = part_acc.get(name, 0.0) + value / accum
                        tokens_seen += sum(len(texts[k]) + 2 for k in mb)
                        continue
                    examples = [enc.examples[k] for k in mb]
                    video = is_video_batch(pix, stage.name)  # videos: the model's forward encodes them
                    audio = is_audio_batch(pix, stage.name)  # clips: likewise
                    if stage.packs and not video and not audio:  # rows of several samples; images stacked in the rows' reading order
                        rows, reading = packed_layout(examples, stage.packing, model.llm.c.max_positions)
                        step_pack.add(pack_stats(examples, rows))
                        pix = [pix[j] for j in reading]
                    pixels, facts = processor.stack(pix) if pix and pix[0] is not None and not video and not audio \
                        else (None, None)
                    batch = audio_training_batch(processor, examples, pix, stage) if audio else \
                        video_training_batch(processor, examples, pix, enc.pixels.transform, stage) if video else \
                        packed_batch(processor, examples, rows, pixels, facts) if stage.packs else \
                        processor.training_batch(examples, pixels, facts)
                    batch = move(batch, self.device)
                    labels = batch.pop("labels")
                    with precision:  # logits only where a target is: the head's matmul and softmax shrink
                        out = train_model(**batch, labels=labels, logits_for="labels")
                    # summed, then divided by the optimizer step's global token count: accumulation and data
                    # parallelism then give exactly the gradients of one big batch
                    _, targets = label_targets(labels)
                    loss_sum = F.cross_entropy(out.logits.float(), targets.to(out.logits.device), reduction="sum")
                    loss = loss_sum * dist.world / max(1, total_tokens)
                    aux = getattr(out, "aux_loss", None)
                    if aux is not None:
                        loss = loss + aux / accum
                    scaler.scale(loss).backward()
                    loss_acc += float(loss_sum.detach()) / max(1, total_tokens)
                    tokens_seen += int(batch["attention_mask"].sum())
                # lm: already divided by the global token count; first-stage losses: the mean over processes
                loss_global = float(dist.all_sum(torch.tensor(loss_acc * 1.0)).item()) / (dist.world if first else 1)
                parts_global = {k: float(dist.all_sum(torch.tensor(v)).item()) / dist.world for k, v in part_acc.items()}
                scaler.unscale_(optim)  # fp16: clip and step on the true gradients (no-op otherwise)
                if stage.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], stage.clip_grad)
                scaler.step(optim)
                scaler.update()
                with warnings.catch_warnings():  # fp16 skips the steps whose gradients overflowed: expected
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                    sched.step()
                step += 1
                result.losses.append(loss_global)
                elapsed = time.perf_counter() - t0
                packing.add(step_pack)
                if dist.main:
                    extra = {"padding": round(step_pack.padding, 4)} if stage.packs else {}
                    append_metric(self.run_dir, {"stage": stage.name, "step": step, "loss": loss_global, **parts_global,
                                  "lr": sched.get_last_lr()[0], "tokens_per_s": tokens_seen * dist.world / max(elapsed, 1e-9),
                                  **extra})
                progress(step, loss_global, tokens_seen * dist.world / max(elapsed, 1e-9))
                if opts.eval_data and opts.eval_every and step % opts.eval_every == 0 and step < total:
                    self._evaluate(model, processor, stage.name, step)
                if step % opts.save_every == 0 and step < total:
                    self._checkpoint(model, optim, sched, ckpt, step, result.losses)
        progress(None, None, None)
        if stage.packs and packing.samples:
            self.log(f"  {packing.line()}")
        if opts.eval_data:
            self._evaluate(model, processor, stage.name, step)
        result.steps = step
        result.seconds = time.perf_counter() - t0
        self._merge_lora(model, lora_modules)
        state = full_state(model)  # every rank takes part: FSDP gathers its shards here
        self._last_state = state
        if dist.main:
            save_state(stage_dir / "weights.safetensors", self._changed_state(model, stage, state, table))
            if ckpt.exists():
                shutil.rmtree(ckpt, ignore_errors=True)
        self.dist.barrier()
        return result

    def _first_stage_step(self, train_model, processor: Processor, first: dict[str, float], pix: list,
                          texts: list[list[int]], stage: Stage, precision) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch of BLIP-2's first-stage objectives: (weighted loss, each loss as a float)."""
        if contrastive_stage.CONTRASTIVE in first:  # CLIP / SigLIP: captions padded to the text tower's length
            inputs = contrastive_stage.step_inputs(processor, pix, texts, stage)
            with precision:
                losses = train_model(*move(inputs, self.device))
            return losses[contrastive_stage.CONTRASTIVE], {k: float(v.detach()) for k, v in losses.items()}
        if not pix or pix[0] is None:
            raise user_error("E0528", f"stage `{stage.name}`: itc / itm / itg need an image with every sample")
        loss_module = train_model.module if hasattr(train_model, "module") else train_model  # under DDP
        words, positions = loss_module.model.components[loss_module.qformer_name].word_table()
        bos = processor.bos_id if processor.bos_id is not None else processor.pad_id
        eos = processor.eos_id if processor.eos_id is not None else processor.pad_id
        text = text_batch(texts, bos, eos, positions.num_embeddings, words.num_embeddings, f"stage `{stage.name}`")
        with precision:
            losses = train_model(*move((processor.stack(pix)[0], text.ids, text.mask), self.device))
        total = sum(first[name] * value for name, value in losses.items())
        return total, {name: float(value.detach()) for name, value in losses.items()}

    def _changed_state(self, model: VisionLanguageModel, stage: Stage, state: dict[str, torch.Tensor],
                       table: ParamTable) -> dict[str, torch.Tensor]:
        """Tensors a stage may have changed: its trainable parameters, plus every parameter under the
        paths whose LoRA adapters were merged or whose experts were up-cycled (frozen by then)."""
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        merged = ParamTable.of(model, self.analysis) if stage.lora else table  # names without the adapters
        for path in [p for lo in stage.lora for p in expand_fusion(lo.path, self.analysis)] + \
                [p for u in stage.upcycle for p in expand_fusion(u.dest, self.analysis)]:
            names.update(merged.covered(path))
        return {k: v for k, v in state.items() if k in names}

    def _checkpoint(self, model: VisionLanguageModel, optim, sched, ckpt: Path, step: int, losses: list[float]) -> None:
        """The stage so far, resumable; under FSDP2 every rank takes part in gathering the full state first."""
        if self._sharded:
            weights, optim_state = gather_fsdp_state(model, optim)
        else:
            weights, optim_state = (trainable_state(model), optim.state_dict()) if self.dist.main else ({}, {})
        if self.dist.main:
            write_checkpoint(ckpt, weights, optim_state, sched, step, losses)

    def _evaluate(self, model: VisionLanguageModel, processor: Processor, stage: str, step: int) -> None:
        """Held-out accuracy with the evaluation code `vlm eval` runs, so the two always agree: VQA, or
        multiple-choice video QA when the held-out records name videos (`held_out_task`)."""
        if self.dist.main:
            from vlmspec.evaluation import run_eval

            task = held_out_task(self.opts.eval_data)
            session = Session(self.analysis, model, processor.tokenizer, processor.instruction_tokenizer)
            was_training = model.training
            model.eval()
            try:  # `vlm eval`'s answer budget too: room for a whole box in a grounding model's format
                results = run_eval(session, task, self.opts.eval_data, progress=False)
            finally:
                model.train(was_training)
            key, what = HELD_OUT_METRIC[task]
            acc = results["metrics"][key]
            metrics = results["metrics"]
            append_metric(self.run_dir, {"stage": stage, "step": step, "eval": task, key: acc,
                          "questions": metrics.get("questions", metrics.get("images"))})
            self.log(f"  {stage} step {step}: held-out {what} {acc:.1f}%")
        self.dist.barrier()

    # ------------------------------------------------------------ LoRA and up-cycling
    def _apply_lora(self, model: VisionLanguageModel, stage: Stage) -> list[torch.nn.Module]:
        if not stage.lora:
            return []
        from vlmspec.runtime.train.lora import inject_lora  # peft is imported when a stage uses LoRA

        return inject_lora(model, self.analysis, stage)

    def _merge_lora(self, model: VisionLanguageModel, modules: list[torch.nn.Module]) -> None:
        if modules:
            from vlmspec.runtime.train.lora import merge_lora

            merge_lora(model)

    def _upcycle(self, model: VisionLanguageModel, stage: Stage) -> bool:
        if not stage.upcycle:
            return False
        upcycle(model)
        return True

    # ------------------------------------------------------------ experience

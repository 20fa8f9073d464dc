"""`vlm train --workers N`: images read in worker processes give exactly the micro-batches, losses, weights
and resume of the single-process path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import get_worker_info
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.inputs.images import ImageTransform
from vlmspec.runtime.train import Trainer, TrainOptions
from vlmspec.runtime.train.loader import DataOrder, StageBatches, StageImages, default_workers

SPEC = """
model tiny {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64  feature = layer(-2).patches }
  connector proj = mlp(clip -> llm) { layers = 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }
  fusion prefix(proj -> llm)
  prompt = "{image}\\n{q} Answer:"
  stage align { train proj  freeze clip, llm  optim adamw(lr = 1e-3)  batch 8  grad_accum = 2  steps 4
                data captions("captions.jsonl")  precision fp32  warmup = 0 }
}
"""


@pytest.fixture(scope="module")
def data(shapes: Path) -> Path:
    return shapes


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("spec") / "tiny.vlm"
    p.write_text(SPEC)
    return str(p)


class Checked:
    """The image transform, asserting where it runs: in a worker process or on the training process."""

    def __init__(self, in_worker: bool):
        self.inner = ImageTransform(32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        self.in_worker = in_worker

    def __call__(self, path: Path) -> torch.Tensor:
        assert (get_worker_info() is not None) == self.in_worker
        return self.inner(path)


def reference_order(step: int, n: int, global_batch: int, steps_per_epoch: int, seed: int, accum: int, micro: int,
                    rank: int, world: int) -> list[list[int]]:
    """The training loop's order as it was written inline before the data loader (the resume contract)."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    batch_ids = order[pos * global_batch:(pos + 1) * global_batch]
    if len(batch_ids) < global_batch:
        batch_ids = (batch_ids + order)[:global_batch]
    mine = batch_ids[rank::world]
    return [mine[j * micro:(j + 1) * micro] for j in range(accum)]


# n, global batch, accum, rank, world: epochs of 2 steps (boundaries crossed), a step past the data's end
# (wrap-around: 12 samples, batches of 16), and the second of two ranks
CASES = [(64, 24, 2, 0, 1), (12, 16, 2, 0, 1), (64, 16, 2, 1, 2)]


@pytest.mark.parametrize("n,global_batch,accum,rank,world", CASES)
def test_workers_give_the_single_process_batches(data: Path, n, global_batch, accum, rank, world) -> None:
    paths = sorted((data / "images").glob("*.png"))[:n]
    micro = global_batch // (accum * world)
    spe = max(1, n // global_batch)
    order = DataOrder(n, global_batch, spe, 3, accum, micro, rank, world)
    start, stop = 1, 6  # from a step other than 0, as a resumed run starts
    want = [mb for s in range(start, stop) for mb in reference_order(s, n, global_batch, spe, 3, accum, micro, rank,
                                                                         world)]
    assert [mb for s in range(start, stop) for mb in order.micro_batches(s)] == want
    got = {}
    for workers in (0, 2):
        images = StageImages(paths, Checked(in_worker=workers > 0))
        with StageBatches(images, order, start, stop, workers) as loader:
            got[workers] = [loader.next(ids) for ids in want]
    plain = StageImages(paths, Checked(in_worker=False))
    for ids, one, two in zip(want, got[0], got[2], strict=True):
        assert len(one) == len(two) == len(ids)
        for k, a, b in zip(ids, one, two, strict=True):
            assert torch.equal(a, b) and torch.equal(a, plain[k])


def test_a_loader_out_of_step_says_so(data: Path) -> None:
    paths = sorted((data / "images").glob("*.png"))[:8]
    order = DataOrder(8, 4, 2, 0, 1, 4)
    with StageBatches(StageImages(paths, Checked(False)), order, 0, 2, 0) as loader, \
            pytest.raises(RuntimeError, match="out of step"):
        loader.next([0, 1, 2, 3])


def test_default_workers_leave_the_cpus_to_training(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(32)), raising=False)
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes share the machine
    assert default_workers() == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 0


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def single(spec: str, data: Path, tmp_path_factory) -> Path:
    """`vlm train --workers 0 --steps 4`: the single-process path."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = CliRunner().invoke(app, ["train", spec, "--data", str(data), "-o", str(out), "--steps", "4", "--workers", "0"])
    assert r.exit_code == 0, r.output
    return out


def test_training_with_workers_is_bitwise_the_same(spec: str, data: Path, single: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    readers = tmp_path / "readers.txt"  # which processes read images (forked workers inherit the patch)
    real = StageImages.__getitem__

    def recorded(self, k):
        with readers.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, k)

    monkeypatch.setattr(StageImages, "__getitem__", recorded)
    r = CliRunner().invoke(app, ["train", spec, "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "4",
                                 "--workers", "2"])
    assert r.exit_code == 0, r.output
    pids = readers.read_text().split()
    # both workers read; the trainer read one image, up front, for the prompt's (fixed) image slot
    assert len(set(pids) - {str(os.getpid())}) == 2 and pids.count(str(os.getpid())) == 1, pids
    assert len(_losses(single)) == 4
    assert _losses(tmp_path / "run") == _losses(single)
    _same_weights(tmp_path / "run", single)


def test_resume_with_workers_is_bitwise(spec: str, data: Path, single: Path, tmp_path: Path, monkeypatch) -> None:
    class Crash(Exception):
        pass

    real = Trainer._checkpoint

    def crash_after_saving(self, *a, **kw):
        real(self, *a, **kw)
        raise Crash

    analysis, _ = load_analysis(spec)

    def run(**kw) -> None:
        opts = TrainOptions(run_dir=tmp_path / "run", data=str(data), steps=4, save_every=2, workers=2, **kw)
        Trainer(analysis, opts, Path(spec).read_text(), spec).run()

    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_saving)
    with pytest.raises(Crash):  # at step 2, its workers reading ahead
        run(quiet=True)
    monkeypatch.setattr(Trainer, "_checkpoint", real)
    log: list[str] = []
    run(resume=True, log=log.append)
    assert "stage align: resumed at step 2/4" in log, log
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert _losses(tmp_path / "run") == _losses(single)
    _same_weights(tmp_path / "run", single)

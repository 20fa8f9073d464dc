"""`vlm train` does exactly what each stage says, resumes bitwise, and scales out without changing the math."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.inputs.synth import synthesize
from vlmspec.runtime.train import Trainer, TrainOptions
from vlmspec.runtime.train import loop as trainer_mod

ROOT = Path(__file__).resolve().parents[2]
VLM = [sys.executable, "-m", "vlmspec.cli"]

SPEC = """
model tiny {
  vision clip = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64  feature = layer(-2).patches }
  connector proj = mlp(clip -> llm) { layers = 2 }
  language llm = llama { width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }
  fusion prefix(proj -> llm)
  prompt = "{image}\\n{q} Answer:"
  stage align { train proj  freeze clip, llm  optim adamw(lr = 1e-3)  batch 8  steps 4  data captions("captions.jsonl")  precision fp32  warmup = 0 }
  stage tune { train proj  lora llm(rank = 4, targets = [attn.q, attn.v])  freeze clip
               optim adamw(lr = 1e-3)  batch 8  steps 4  data llava("train.json")  precision fp32  warmup = 0 }
}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    synthesize(d, n_train=48, n_test=4, size=32, seed=1)
    return d


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("spec") / "tiny.vlm"
    p.write_text(SPEC)
    return str(p)


def run(spec: str, data: Path, out: Path, **kw) -> Trainer:
    analysis, _ = load_analysis(spec)
    t = Trainer(analysis, TrainOptions(run_dir=out, data=str(data), quiet=True, **kw), Path(spec).read_text(), spec)
    t.run()
    return t


def by_component(state: dict[str, torch.Tensor], comp: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(f"components.{comp}.")}


def test_stage_trains_exactly_what_it_says(spec, data, tmp_path, monkeypatch) -> None:
    optimizers = []
    real = trainer_mod.make_optimizer
    monkeypatch.setattr(trainer_mod, "make_optimizer", lambda groups, stage: optimizers.append(real(groups, stage))
                        or optimizers[-1])
    run(spec, data, tmp_path / "run", stages=["align"])
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for comp in ("clip", "llm"):
        for k, v in by_component(init, comp).items():
            assert torch.equal(v, final[k]), f"frozen {k} changed"
    changed = [k for k, v in by_component(init, "proj").items() if not torch.equal(v, final[k])]
    assert changed and len(changed) == len(by_component(init, "proj"))
    # the optimizer holds state for the trained parameters only
    (opt,) = optimizers
    states = [p for p in opt.state]
    assert states and all(p.requires_grad for p in states)
    assert sum(p.numel() for p in states) == load_analysis(spec)[0].plans[0].total_trainable
    stage_out = load_file(str(tmp_path / "run" / "stages" / "01-align" / "weights.safetensors"))
    assert set(stage_out) == set(by_component(init, "proj"))  # only what the stage trained is saved
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["state"] for s in manifest["stages"]] == ["done", "pending"]


def test_lora_stays_in_the_named_component(spec, data, tmp_path, monkeypatch) -> None:
    wrapped = []
    from vlmspec.runtime.train import lora

    real = lora.inject_lora
    monkeypatch.setattr(lora, "inject_lora", lambda *a: wrapped.extend(real(*a)) or wrapped)
    run(spec, data, tmp_path / "run")
    names = [n for n in wrapped]
    assert wrapped, "no module was adapted"
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(final) == set(init), "LoRA wrappers must be merged away in the final model"
    for k in by_component(init, "clip"):
        assert torch.equal(init[k], final[k]), f"vision tower touched: {k}"
    touched = {k for k in by_component(init, "llm") if not torch.equal(init[k], final[k])}
    assert touched and all(("q_proj" in k or "v_proj" in k) for k in touched), touched
    del names


def test_kill_and_resume_is_bitwise(spec, data, tmp_path) -> None:
    args = [*VLM, "train", spec, "--data", str(data), "--stage", "align", "--steps", "40", "--save-every", "2"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([*args, "-o", str(tmp_path / "straight")], check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = killed / "stages" / "01-align" / "ckpt" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 6:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    saved = json.loads(state.read_text())["step"]  # the last checkpoint before the kill
    r = subprocess.run([*args, "-o", str(killed), "--resume"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    # it resumed from that checkpoint (a run that started again would reach the same weights too)
    assert 6 <= saved < 40 and f"resumed at step {saved}/40" in r.stderr, (saved, r.stderr[-2000:])
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 41))  # each step once: none trained twice
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_refuses_to_overwrite_a_run(spec, data, tmp_path) -> None:
    args = [*VLM, "train", spec, "--data", str(data), "--stage", "align", "--steps", "1", "-o", str(tmp_path / "r")]
    subprocess.run(args, check=True, capture_output=True)
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "E0532" in r.stderr and "Traceback" not in r.stderr


def one_then_two(spec: str, data: Path, tmp: Path, stage: str, fsdp: bool) -> None:
    """Train `stage` for 3 steps in one process, then in two under torchrun (DDP, or FSDP2): the same losses."""
    common = ["train", spec, "--data", str(data), "--stage", stage, "--steps", "3"]
    subprocess.run([*VLM, *common, "-o", str(tmp / "one")], check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vlmspec.cli", *common, "-o", str(tmp / "two"), *(["--fsdp"] if fsdp else [])]
    r = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one = [json.loads(x)["loss"] for x in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5, (one, two)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(spec, data, tmp_path, mode) -> None:
    one_then_two(spec, data, tmp_path, "align", mode == "fsdp")
    from vlmspec.runtime.session import load_session

    model = load_session(tmp_path / "two" / "final")  # loads in a single process
    assert model.processor is not None


@pytest.mark.parametrize("how", ["full", "lora"])
def test_fsdp_trains_the_language_model(data, tmp_path, how) -> None:
    """FSDP2 shards a trained (or LoRA-adapted) language model, which the model calls through `embed`,
    `decode` and `logits` rather than its forward: each gathers the shards as forward would, and two
    processes give one process's losses."""
    text = SPEC if how == "lora" else SPEC.replace(
        "stage tune { train proj  lora llm(rank = 4, targets = [attn.q, attn.v])  freeze clip",
        "stage tune { train proj, llm  freeze clip")
    spec = tmp_path / "tiny.vlm"
    spec.write_text(text)
    one_then_two(str(spec), data, tmp_path, "tune", fsdp=True)


def _kill_all_running(marker: str) -> None:
    """SIGKILL every process whose command line mentions `marker` (the launcher and its workers)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_fsdp_kill_and_resume_matches_a_straight_run(spec, data, tmp_path) -> None:
    """Under FSDP2 the checkpoint gathers the sharded state (every rank takes part) and a resumed run
    reaches the parameters of an uninterrupted one."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vlmspec.cli", "train", spec, "--data", str(data), "--stage", "align", "--steps", "40",
                "--save-every", "2", "--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    r = subprocess.run([*torchrun, "-o", str(tmp_path / "straight")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*torchrun, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    state = killed / "stages" / "01-align" / "ckpt" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    _kill_all_running(str(killed))  # torchrun's workers live in their own process groups
    proc.wait()
    assert not (killed / "final").exists()
    saved = json.loads(state.read_text())["step"]  # the last checkpoint before the kill
    r = subprocess.run([*torchrun, "-o", str(killed), "--resume"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 4 <= saved < 40 and f"resumed at step {saved}/40" in r.stderr, (saved, r.stderr[-3000:])
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41)), steps
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

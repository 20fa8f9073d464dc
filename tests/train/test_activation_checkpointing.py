"""`activation_checkpointing`: the same loss and gradients with and without it, for every block stack the
runtime has, under LoRA, with a frozen LLM behind a trained connector, through the trainer, and a peak
memory that actually drops (slow test, in fresh processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.blocks import CheckpointedBlocks
from vlmspec.runtime.model import build_model
from vlmspec.runtime.train.activations import checkpointing, set_checkpointing
from vlmspec.runtime.train.freeze import apply_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_helpers import CASES, image_tokens, labels_for, pixels, prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VLM = [sys.executable, "-m", "vlmspec.cli"]

TINY = """
model tiny {{
  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 48  depth = 3  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }}
  fusion prefix(proj -> llm)
  {stages}
}}
"""
STAGES = {
    "trained_llm": "stage s { train proj, llm  freeze clip  activation_checkpointing = true }",
    "lora_llm": "stage s { train proj  lora llm(rank = 4, targets = [attn.q, attn.v, mlp.down])  freeze clip "
                "activation_checkpointing = [llm] }",
    "frozen_llm": "stage s { train proj  freeze clip, llm  activation_checkpointing = true }",
    "everything": "stage s { train clip, proj, llm  activation_checkpointing = [clip, llm] }",
}
#: what each stage checkpoints: the trained / adapted components with blocks, and a frozen LLM that the
#: gradients cross on their way to the connector; never the frozen encoder in front of everything trained
EXPECTED = {"trained_llm": ["llm"], "lora_llm": ["llm"], "frozen_llm": ["llm"], "everything": ["clip", "llm"]}


def _analysis(tmp_path: Path, text: str):
    path = tmp_path / "spec.vlm"
    path.write_text(text)
    analysis, _ = load_analysis(str(path))
    return analysis


def _loss_and_grads(model, analysis, names: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids, mask = prompts(model.image_token_id, image_tokens(analysis), batch=3, text=8)
    labels = labels_for(ids, mask, model.image_token_id)
    with checkpointing(model.components, names):
        out = model(ids, attention_mask=mask, pixel_values=pixels(analysis, batch=3), labels=labels)
        loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_same(plain, ckpt) -> None:
    (loss0, g0), (loss1, g1) = plain, ckpt
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("case", list(STAGES))
def test_stage_recomputes_to_the_same_loss_and_gradients(tmp_path, case) -> None:
    analysis = _analysis(tmp_path, TINY.format(stages=STAGES[case]))
    (plan,) = analysis.plans
    assert plan.checkpointed == EXPECTED[case]
    torch.manual_seed(0)
    model = build_model(analysis)
    model.train()
    apply_stage(model, analysis, "s")
    if analysis.ir.stages[0].lora:
        from vlmspec.runtime.train.lora import inject_lora

        inject_lora(model, analysis, analysis.ir.stages[0])
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
                torch.nn.init.normal_(p, std=0.02)  # lora_B starts at zero: give it gradients to compare
    calls = []
    real = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
        plain = _loss_and_grads(model, analysis, [])
        assert not calls
        ckpt = _loss_and_grads(model, analysis, plan.checkpointed)
    finally:
        torch.utils.checkpoint.checkpoint = real
    depth = {"clip": 2, "llm": 3}
    assert len(calls) == sum(depth[n] for n in plan.checkpointed)
    assert all(kw == {"use_reentrant": False} for kw in calls)
    _assert_same(plain, ckpt)
    if case == "frozen_llm":  # the gradients crossed the frozen LLM to reach the connector
        assert any(k.startswith("components.proj.") for k in ckpt[1])
        assert not any(k.startswith("components.llm.") for k in ckpt[1])
    # cleared after the stage: evaluation and the next stage run as without it
    assert not any(m.checkpoint_blocks for m in model.modules() if isinstance(m, CheckpointedBlocks))


@pytest.fixture
def one_thread():
    """One thread for an exact comparison, and the process's count back afterwards (a later test's training
    run must not inherit it: its numbers would change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_block_stack_recomputes_exactly(tmp_path, case, one_thread) -> None:
    """Every component kind that declares blocks (`checkpointable`) runs them through `run_block`, and
    recomputing them (with everything trainable) changes neither the loss nor any gradient."""
    analysis = _analysis(tmp_path, CASES[case].text())
    torch.manual_seed(0)
    model = build_model(analysis)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    names = [n for n, c in analysis.ir.components.items() if c.config.checkpointable]
    for name, comp in model.components.items():
        has = any(isinstance(m, CheckpointedBlocks) for m in comp.modules())
        assert has == (name in names), f"`{name}`: schema and module disagree about its blocks"
    _assert_same(_loss_and_grads(model, analysis, []), _loss_and_grads(model, analysis, names))


def test_only_while_training_with_gradients(tmp_path) -> None:
    analysis = _analysis(tmp_path, TINY.format(stages=STAGES["trained_llm"]))
    model = build_model(analysis)
    set_checkpointing(model.components, ["llm"])
    calls = []
    real = torch.utils.checkpoint.checkpoint
    ids, mask = prompts(model.image_token_id, image_tokens(analysis))
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        model.eval()
        model(ids, attention_mask=mask, pixel_values=pixels(analysis))
        model.train()
        with torch.no_grad():
            model(ids, attention_mask=mask, pixel_values=pixels(analysis))
        assert not calls
        model(ids, attention_mask=mask, pixel_values=pixels(analysis))
        assert len(calls) == 3
    finally:
        torch.utils.checkpoint.checkpoint = real


def test_the_trainer_checkpoints_and_matches_a_plain_run(tmp_path) -> None:
    from vlmspec.runtime.inputs.synth import synthesize
    from vlmspec.runtime.train import Trainer, TrainOptions

    data = tmp_path / "data"
    synthesize(data, n_train=16, n_test=2, size=32, seed=1)
    stage = ("stage s {{ train proj  lora llm(rank = 4)  freeze clip  optim adamw(lr = 1e-3)  batch 4  steps 2 "
             "data captions(\"captions.jsonl\")  warmup = 0 {extra} }}")
    losses = {}
    calls = []
    real = torch.utils.checkpoint.checkpoint
    for name, extra in (("plain", ""), ("ckpt", "activation_checkpointing = true")):
        spec = tmp_path / f"{name}.vlm"
        spec.write_text(TINY.format(stages=stage.format(extra=extra)))
        analysis, _ = load_analysis(str(spec))
        trainer = Trainer(analysis, TrainOptions(run_dir=tmp_path / name, data=str(data), quiet=True),
                          spec.read_text(), str(spec))
        try:
            torch.utils.checkpoint.checkpoint = lambda *a, name=name, **kw: calls.append(name) or real(*a, **kw)
            trainer.run()
        finally:
            torch.utils.checkpoint.checkpoint = real
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert not any(m.checkpoint_blocks for m in trainer.session.model.modules()
                       if isinstance(m, CheckpointedBlocks))
    assert set(calls) == {"ckpt"} and len(calls) == 2 * 3  # 2 steps x 3 decoder layers
    assert losses["ckpt"] == pytest.approx(losses["plain"], abs=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_checkpointed_match_one_plain(tmp_path, mode) -> None:
    """Under DDP, and under FSDP2 with a checkpointed component sharded (the trained encoder) and one
    replicated (the frozen LLM the gradients cross), two checkpointed processes take the steps one plain
    process takes. (FSDP2 shards the components a stage trains; the LLM is driven through `embed` /
    `decode`, not its `forward`, so FSDP2 cannot shard a trained LLM yet, checkpointed or not.)"""
    from vlmspec.runtime.inputs.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, n_train=16, n_test=2, size=32, seed=1)
    targets = "train proj, llm  freeze clip" if mode == "ddp" else "train clip, proj  freeze llm"
    stage = ("stage s {{ " + targets + "  optim adamw(lr = 1e-3)  batch 4  steps 2 "
             "data captions(\"captions.jsonl\")  warmup = 0 {extra} }}")
    specs = {}
    for name, extra in (("plain", ""), ("ckpt", "activation_checkpointing = true")):
        specs[name] = tmp_path / f"{name}.vlm"
        specs[name].write_text(TINY.format(stages=stage.format(extra=extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "--data", str(data)]
    r = subprocess.run([*VLM, common[0], str(specs["plain"]), *common[1:], "-o", str(tmp_path / "one")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vlmspec.cli", common[0], str(specs["ckpt"]), *common[1:], "-o", str(tmp_path / "two")]
    if mode == "fsdp":
        torchrun.append("--fsdp")
    r = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = "llm" if mode == "ddp" else "clip, llm"
    assert f"activation checkpointing: {expected} (" in r.stdout + r.stderr
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5, (one, two)


@pytest.mark.parametrize("value", ["true", "[llm, clip]", "false"])
def test_round_trips_through_fmt_and_show(tmp_path, value) -> None:
    from vlmspec.compiler.printer import format_text
    from vlmspec.compiler.show import resolved_text

    text = TINY.format(stages=f"stage s {{ train clip, proj, llm  activation_checkpointing = {value} }}")
    formatted = format_text(text)
    assert f"activation_checkpointing = {value}" in formatted and format_text(formatted) == formatted
    shown = resolved_text(_analysis(tmp_path, formatted))
    assert f"activation_checkpointing = {value}" in shown
    again = tmp_path / "again"
    again.mkdir()
    assert _analysis(again, shown).ir.stages[0].activation_checkpointing == \
        {"true": True, "false": False}.get(value, ["llm", "clip"])


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.activations import set_checkpointing
    from vlmspec.runtime.train.freeze import apply_stage

    torch.set_num_threads(2)
    analysis, _ = load_analysis(sys.argv[1])
    torch.manual_seed(0)
    model = build_model(analysis)
    model.train()
    apply_stage(model, analysis, "s")
    set_checkpointing(model.components, analysis.plans[0].checkpointed)
    batch, n_img, text = 32, 256, 64
    g = torch.Generator().manual_seed(1)
    tok = model.image_token_id
    ids = torch.cat([torch.full((batch, n_img), tok), torch.randint(3, tok, (batch, text), generator=g)], 1)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(ids == tok, -100)
    px = torch.randn(batch, 3, 128, 128, generator=g)
    out = model(ids, attention_mask=mask, pixel_values=px, labels=labels)
    out.loss.backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loss": float(out.loss.detach()), "peak_mib": peak_kib / 1024}))
""")

BIG = """
model big {{
  vision clip = vit {{ image_size = 128  patch_size = 8  width = 64  depth = 2  heads = 2  mlp = 128 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 256  depth = 8  heads = 4  ffn = 1024  vocab = 400  max_positions = 512 }}
  fusion prefix(proj -> llm)
  stage s {{ train proj, llm  freeze clip  activation_checkpointing = {value} }}
}}
"""


@pytest.mark.slow
def test_checkpointing_cuts_peak_memory(tmp_path) -> None:
    """One training step of a model whose activations dominate (width 256, 8 layers, 256 image tokens,
    batch 32), each way in a fresh process so that its peak RSS is its own."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    result = {}
    for value in ("false", "true"):
        spec = tmp_path / f"{value}.vlm"
        spec.write_text(BIG.format(value=value))
        # a fixed mmap threshold: glibc otherwise raises it as big blocks are freed, keeps later activations in
        # a heap it does not give back, and the peak RSS then measures fragmentation (0.45-0.65 run to run)
        r = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"})
        assert r.returncode == 0, r.stderr[-3000:]
        result[value] = json.loads(r.stdout.strip().splitlines()[-1])
    plain, ckpt = result["false"], result["true"]
    ratio = ckpt["peak_mib"] / plain["peak_mib"]
    print(f"peak RSS: plain {plain['peak_mib']:.0f} MiB, checkpointed {ckpt['peak_mib']:.0f} MiB, ratio {ratio:.2f}; "
          f"first-step loss {plain['loss']:.6f} / {ckpt['loss']:.6f}")
    assert abs(plain["loss"] - ckpt["loss"]) <= 1e-6
    assert ratio <= 0.7

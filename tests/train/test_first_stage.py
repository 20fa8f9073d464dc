"""BLIP-2's first-stage objectives (itc, itm, itg): the attention masks mean what the paper says, the
losses reach the right parameters, and `vlm train` runs them exactly like any other stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmspec.compiler.compile import load_analysis
from vlmspec.runtime.inputs.synth import synthesize
from vlmspec.runtime.model import build_model
from vlmspec.runtime.train import Trainer, TrainOptions
from vlmspec.runtime.train import loop as trainer_mod
from vlmspec.runtime.train import objectives as O

VLM = [sys.executable, "-m", "vlmspec.cli"]

SPEC = """
model b2 {
  vision eva = eva { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64  feature = layer(-1).all }
  connector qf = qformer(eva -> llm) { queries = 4  width = 32  depth = 2  heads = 2  mlp = 64  pretrain = true
                                       text_vocab = 512  max_text = 32  embed_dim = 16 }
  language llm = opt { width = 48  depth = 1  heads = 4  ffn = 96  vocab = 512  max_positions = 128 }
  fusion prefix(qf -> llm) { tokens = 4 }
  stage align { train qf  freeze eva, llm, qf.proj  objective itc + itm + 0.5 * itg  optim adamw(lr = 1e-3)
                batch 8  steps 4  data captions("captions.jsonl")  warmup = 0 }
  stage gen { train qf  freeze eva, llm, qf.pretrain  optim adamw(lr = 1e-3)  batch 8  steps 2
              data captions("captions.jsonl")  warmup = 0 }
}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    synthesize(d, n_train=32, n_test=4, size=32, seed=3)
    return d


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("spec") / "b2.vlm"
    p.write_text(SPEC)
    return str(p)


@pytest.fixture()
def model(spec):
    torch.manual_seed(0)
    return build_model(load_analysis(spec)[0]).eval()


def _text(n: int, length: int, seed: int = 0) -> O.TextBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 2:] = 0  # one padded row
    return O.TextBatch(ids, mask)


def test_generation_mask_keeps_queries_blind_to_text_and_text_causal(model) -> None:
    name, qf = O.find_qformer(model)
    image = O.image_features(model, name, torch.randn(2, 3, 32, 32))
    text = _text(2, 6)
    nq = qf.query_tokens.shape[1]
    seen: list[torch.Tensor] = []
    real_run = qf.qformer.run

    def spy(h, image, n_query, mask):
        out = real_run(h, image, n_query, mask)
        seen.append(out)
        return out

    qf.qformer.run = spy
    O.itg_loss(qf, image, text)
    changed = O.TextBatch(text.ids.clone(), text.mask)
    changed.ids[:, 4] = 7  # change the 5th text token only
    O.itg_loss(qf, image, changed)
    a, b = seen
    assert torch.equal(a[:, :nq], b[:, :nq]), "queries must not read the text in itg"
    assert torch.equal(a[:, nq:nq + 4], b[:, nq:nq + 4]), "a text token must not read later tokens"
    assert not torch.equal(a[:, nq + 4:], b[:, nq + 4:])


def test_matching_mask_is_bidirectional(model) -> None:
    name, qf = O.find_qformer(model)
    image = O.image_features(model, name, torch.randn(2, 3, 32, 32))
    text = _text(2, 6)
    nq = qf.query_tokens.shape[1]
    h = qf.qformer.run(qf.embed(qf.queries_for(2), text.ids), image, nq, O._pad_keys(text.mask, nq))
    ids = text.ids.clone()
    ids[1, 3] = 9
    h2 = qf.qformer.run(qf.embed(qf.queries_for(2), ids), image, nq, O._pad_keys(text.mask, nq))
    assert not torch.equal(h[1, :nq], h2[1, :nq]), "in itm the queries read the text"
    assert torch.equal(h[0], h2[0])
    # padding is invisible: a padded row's real tokens do not depend on what the padding holds
    ids = text.ids.clone()
    ids[0, -1] = 11
    h3 = qf.qformer.run(qf.embed(qf.queries_for(2), ids), image, nq, O._pad_keys(text.mask, nq))
    assert torch.allclose(h[0, :nq + 4], h3[0, :nq + 4], atol=1e-6)


def test_hard_negatives_are_never_the_positive() -> None:
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    for _ in range(20):
        neg = O._hard_negatives(sim)
        assert not torch.any(neg == torch.arange(6))


def test_each_loss_reaches_its_parameters(model) -> None:
    name, qf = O.find_qformer(model)
    px = torch.randn(4, 3, 32, 32)
    text = _text(4, 5)
    for objective, must, never in [
        ("itc", {"vision_projection.weight", "text_projection.weight", "temp", "embeddings.word_embeddings.weight"},
         {"itm_head.weight", "itg_head.bias"}),
        ("itm", {"itm_head.weight", "embeddings.word_embeddings.weight", "query_tokens"},
         {"vision_projection.weight", "itg_head.bias"}),
        ("itg", {"itg_head.bias", "itg_head.transform.dense.weight", "embeddings.word_embeddings.weight"},
         {"itm_head.weight", "text_projection.weight"}),
    ]:
        model.zero_grad(set_to_none=True)
        losses = O.first_stage_losses(model, name, px, text, {objective})
        assert set(losses) == {objective} and torch.isfinite(losses[objective])
        losses[objective].backward()
        grads = {n for n, p in qf.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert must <= grads, (objective, must - grads)
        assert not (never & grads), (objective, never & grads)
        assert all(p.grad is None for p in qf.language_projection.parameters())


def test_contrastive_loss_is_low_for_matching_features() -> None:
    matched = 3 * torch.eye(5)  # each image most similar to its own text
    swapped = matched[[1, 2, 3, 4, 0]]
    uniform = torch.zeros(5, 5)
    assert O.itc_loss(matched) < O.itc_loss(uniform) < O.itc_loss(swapped)


def run(spec: str, data: Path, out: Path, **kw) -> Trainer:
    analysis, _ = load_analysis(spec)
    t = Trainer(analysis, TrainOptions(run_dir=out, data=str(data), **{"quiet": True, **kw}), Path(spec).read_text(),
                spec)
    t.run()
    return t


def test_first_stage_trains_exactly_what_it_says(spec, data, tmp_path, monkeypatch) -> None:
    optimizers = []
    real = trainer_mod.make_optimizer
    monkeypatch.setattr(trainer_mod, "make_optimizer", lambda groups, stage: optimizers.append(real(groups, stage))
                        or optimizers[-1])
    run(spec, data, tmp_path / "run")
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    after = load_file(str(tmp_path / "run" / "stages" / "01-align" / "weights.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for k, v in init.items():
        if k.startswith(("components.eva.", "components.llm.")):
            assert torch.equal(v, final[k]), f"frozen {k} changed"
    assert not any(k.startswith("components.qf.language_projection") for k in after), "stage 1 freezes qf.proj"
    for part in ("vision_projection.weight", "text_projection.weight", "itm_head.weight", "itg_head.bias", "temp",
                 "embeddings.word_embeddings.weight", "query_tokens"):
        key = f"components.qf.{part}"
        assert not torch.equal(init[key], after[key]), f"{part} did not learn in stage 1"
    stage1_opt = optimizers[0]  # (stage 2 has since frozen qf.pretrain: requires_grad no longer tells)
    assert sum(p.numel() for p in stage1_opt.state) == load_analysis(spec)[0].plans[0].total_trainable
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    align = [r for r in rows if r["stage"] == "align"]
    assert len(align) == 4 and all({"itc", "itm", "itg"} <= set(r) for r in align)
    r0 = align[0]
    assert r0["loss"] == pytest.approx(r0["itc"] + r0["itm"] + 0.5 * r0["itg"], rel=1e-5)
    # stage 2 (lm) leaves the first-stage heads alone
    gen_out = load_file(str(tmp_path / "run" / "stages" / "02-gen" / "weights.safetensors"))
    assert not any(k.startswith("components.qf.itm_head") for k in gen_out)
    assert torch.equal(after["components.qf.itm_head.weight"], final["components.qf.itm_head.weight"])


def test_first_stage_resume_is_bitwise(spec, data, tmp_path, monkeypatch) -> None:
    straight = run(spec, data, tmp_path / "straight", stages=["align"], save_every=2)
    del straight

    class Crash(Exception):
        pass

    real = Trainer._checkpoint

    def crash_after_saving(self, *a, **kw):
        real(self, *a, **kw)
        raise Crash

    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_saving)
    with pytest.raises(Crash):
        run(spec, data, tmp_path / "crashed", stages=["align"], save_every=2)
    monkeypatch.setattr(Trainer, "_checkpoint", real)
    log: list[str] = []
    run(spec, data, tmp_path / "crashed", stages=["align"], save_every=2, resume=True, quiet=False, log=log.append)
    # it resumed (a run that ignored its checkpoint and started again would reach the same weights)
    assert any("stage align: resumed at step 2/4" in line for line in log), log
    steps = [json.loads(x)["step"] for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps  # steps 3 and 4 trained after the restart, 1 and 2 not again
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_stage_errors_are_one_line(data, tmp_path) -> None:
    mixed = SPEC.replace("objective itc + itm + 0.5 * itg", "objective itc + lm")
    small = SPEC.replace("batch 8  steps 4", "batch 1  steps 1")
    vocab = SPEC.replace("text_vocab = 512", "text_vocab = 64")
    for text, code, words in [(mixed, "E0527", "mixes `lm`"), (small, "E0528", "at least 2"),
                              (vocab, "E0528", "text_vocab")]:
        p = tmp_path / f"{code}-{len(text)}.vlm"
        p.write_text(text)
        r = subprocess.run([*VLM, "train", str(p), "--data", str(data), "-o", str(tmp_path / p.stem), "--stage",
                            "align"], capture_output=True, text=True)
        assert r.returncode == 1 and code in r.stderr and words in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_first_stage_under_ddp(spec, data, tmp_path) -> None:
    """Two gloo processes: the loss module is what DDP wraps, unused heads (no itm here) are allowed."""
    text = Path(spec).read_text().replace("objective itc + itm + 0.5 * itg", "objective itc + itg")
    p = tmp_path / "ddp.vlm"
    p.write_text(text)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vlmspec.cli", "train", str(p), "--data", str(data), "--stage", "align", "--steps", "2",
                "-o", str(tmp_path / "two")]
    r = subprocess.run(torchrun, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"itc", "itg"} <= set(row) and "itm" not in row for row in rows)
    from vlmspec.runtime.session import load_session

    model = load_session(tmp_path / "two" / "final").model  # loads in a single process
    assert model.components["qf"].pretrain

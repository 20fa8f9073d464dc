"""Contrastive pre-training from the CLI: `vlm data synth -> vlm train -> vlm eval --task zero_shot / retrieval`.

Fast: each loss (CLIP softmax, SigLIP sigmoid) trains its tiny spec for a few steps and the folder loads,
evaluates and resumes; a micro-batch of one pair is refused; generation commands refuse the model.
Slow (one test): the tiny CLIP, from scratch, classifies the held-out images' colours zero-shot far above
chance (6 colours: chance 16.7 %).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
CLIP = f"{ROOT}/specs/clip-vit-b-16.vlm:clip_vit_b_16_tiny"
SIGLIP = f"{ROOT}/specs/siglip-b-16.vlm:siglip_b_16_tiny"


def _vlm(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("spec", [CLIP, SIGLIP], ids=["softmax", "sigmoid"])
def test_each_loss_trains_loads_and_evaluates(spec: str, shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = _vlm("train", spec, "--data", str(shapes), "-o", str(run), "--steps", "4", "--save-every", "2")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(x == x and x > 0 for x in losses), out
    zs = _vlm("eval", str(run / "final"), "--task", "zero_shot", "--data", str(shapes / "test_zero_shot.jsonl"))
    assert "zero_shot_accuracy" in zs and "chance" in zs
    rt = _vlm("eval", str(run / "final"), "--task", "retrieval", "--data", str(shapes / "test_captions.jsonl"))
    assert "i2t_r1" in rt
    # a finished run resumes to "already done", loading its stage output
    again = _vlm("train", spec, "--data", str(shapes), "-o", str(run), "--steps", "4", "--resume")
    assert "already done" in again


def test_resume_mid_stage_continues_from_the_checkpoint(shapes: Path, tmp_path: Path) -> None:
    """A checkpoint written mid-stage (as a killed run leaves it) is resumed at its step."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.train.loop import Trainer, TrainOptions

    run = tmp_path / "run"
    analysis = load_analysis(CLIP)[0]
    opts = TrainOptions(run_dir=run, data=str(shapes), steps=4, save_every=2, quiet=True)
    trainer = Trainer(analysis, opts, Path(CLIP.split(":")[0]).read_text(), CLIP)
    original = trainer._checkpoint
    calls: list[int] = []

    def stop_after_first(model, optim, sched, ckpt, step, losses):  # checkpoint at step 2, then "crash"
        original(model, optim, sched, ckpt, step, losses)
        calls.append(step)
        raise KeyboardInterrupt

    trainer._checkpoint = stop_after_first  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert calls == [2]
    out = _vlm("train", CLIP, "--data", str(shapes), "-o", str(run), "--steps", "4", "--resume")
    assert "resumed at step 2/4" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_freeze_a_tower_or_adapt_it_with_lora(shapes: Path, tmp_path: Path) -> None:
    """`freeze img` continues a (pretrained) image tower: the stage writes no image-tower tensor; `lora img`
    trains adapters that are merged into it."""
    from safetensors import safe_open

    spec = tmp_path / "m.vlm"
    spec.write_text(f'import "{CLIP.split(":")[0]}"\n'
                    "model fz extends clip_vit_b_16_tiny {\n  stage pretrain { train txt, fusion  freeze img  "
                    'objective contrastive  data "captions.jsonl"  batch 8 }\n}\n'
                    "model lo extends clip_vit_b_16_tiny {\n  stage pretrain { train fusion  freeze txt  "
                    'lora img(rank = 4)  objective contrastive  data "captions.jsonl"  batch 8 }\n}\n')
    for model, written in (("fz", {"txt", "contrastive"}), ("lo", {"img", "contrastive"})):
        run = tmp_path / model
        _vlm("train", f"{spec}:{model}", "--data", str(shapes), "-o", str(run), "--steps", "2")
        (weights,) = run.glob("stages/*/weights.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {k.split(".")[1] for k in f.keys()} == written


def test_micro_batch_of_one_is_refused(shapes: Path, tmp_path: Path) -> None:
    spec = tmp_path / "one.vlm"
    spec.write_text(Path(CLIP.split(":")[0]).read_text() + "\nmodel one extends clip_vit_b_16_tiny {\n"
                    "  stage pretrain {\n    train img, txt, fusion\n    objective contrastive\n"
                    '    data "captions.jsonl"\n    batch 1\n  }\n}\n')
    r = CliRunner().invoke(app, ["train", f"{spec}:one", "--data", str(shapes), "-o", str(tmp_path / "run"),
                                 "--steps", "1"])
    assert r.exit_code != 0 and "E0618" in r.output, r.output


@pytest.mark.parametrize("spec", [CLIP, SIGLIP], ids=["softmax", "sigmoid"])
def test_vlm_train_keeps_a_fixed_temperature(spec: str, shapes: Path, tmp_path: Path) -> None:
    """`learn_temperature = false`: `vlm train` leaves the head's scale (and SigLIP's bias) exactly at the spec's
    values although the stage trains the fusion; without it they move (the stage's `train` once overrode it)."""
    import math

    from safetensors.torch import load_file

    path, name = spec.split(":")
    text = Path(path).read_text() + f"\nmodel fixed extends {name} {{\n  contrastive {{ learn_temperature = false }}\n}}\n"
    (tmp_path / "m.vlm").write_text(text)
    values = {}
    for model in ("fixed", name):
        _vlm("train", f"{tmp_path / 'm.vlm'}:{model}", "--data", str(shapes), "-o", str(tmp_path / model),
             "--steps", "3")
        state = load_file(str(tmp_path / model / "final" / "model.safetensors"))
        values[model] = {k.rsplit(".", 1)[1]: float(v) for k, v in state.items() if ".logit_" in k}
    scale = math.log(10.0) if spec == SIGLIP else math.log(1 / 0.07)  # the specs' temperatures
    assert values["fixed"]["logit_scale"] == pytest.approx(scale, abs=1e-6)
    assert values[name]["logit_scale"] != pytest.approx(scale, abs=1e-6)
    if spec == SIGLIP:
        assert values["fixed"]["logit_bias"] == -10.0 and values[name]["logit_bias"] != -10.0
    # the plan counts what the run trains: the fixed scale (and bias) are not trainable parameters
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.train.freeze import apply_stage, trainable_count

    for model in ("fixed", name):
        analysis = load_analysis(f"{tmp_path / 'm.vlm'}:{model}")[0]
        built = build_model(analysis, device="meta")
        apply_stage(built, analysis, "pretrain")
        assert analysis.plans[0].total_trainable == trainable_count(built), model


def test_train_eval_scores_zero_shot_and_refuses_vqa_before_training(shapes: Path, tmp_path: Path) -> None:
    """`vlm train --eval` reads the task off the held-out records: zero-shot records are scored with `vlm eval`'s
    code (logged and in metrics.jsonl); VQA records, which a contrastive model cannot answer, are refused before
    any step runs (no run folder is written)."""
    out = _vlm("train", CLIP, "--data", str(shapes), "-o", str(tmp_path / "run"), "--steps", "2",
               "--eval", str(shapes / "test_zero_shot.jsonl"))
    assert "held-out zero-shot accuracy" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval") == "zero_shot"]
    assert len(evals) == 1 and 0 <= evals[0]["zero_shot_accuracy"] <= 100 and evals[0]["questions"] > 0
    r = CliRunner().invoke(app, ["train", CLIP, "--data", str(shapes), "-o", str(tmp_path / "vqa"), "--steps", "2",
                                 "--eval", str(shapes / "test_vqa.jsonl")])
    assert r.exit_code == 1 and "E0615" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "vqa").exists()


def test_generative_commands_and_tasks_refuse(shapes: Path, tmp_path: Path) -> None:
    _vlm("build", CLIP, "-o", str(tmp_path / "m"))
    image = str(next((shapes / "images").glob("*.png")))
    for args in (["generate", str(tmp_path / "m"), "--image", image, "--prompt", "hi"],
                 ["export", str(tmp_path / "m"), "-o", str(tmp_path / "x")],
                 ["eval", str(tmp_path / "m"), "--task", "vqa", "--data", str(shapes / "test_vqa.jsonl")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code != 0 and "E0615" in r.output and "Traceback" not in r.output, (args, r.output)


def test_export_hf_writes_a_folder_transformers_scores_alike(tmp_path: Path) -> None:
    """A fresh tiny SigLIP (its head at the spec's temperature and bias) goes out through `vlm export-hf`, and
    transformers' SiglipModel reads it to our logits within 1e-5. The tiny CLIP pools at the byte tokenizer's
    end of text, id 2, which transformers' CLIPModel reads as the original checkpoints' argmax pooling: its
    export is refused (E0586) instead of written to score otherwise. (An imported CLIP's round trip:
    tests/weights/test_parity_clip.py.)"""
    import torch
    import transformers

    from vlmspec.runtime.session import load_session

    _vlm("build", SIGLIP, "-o", str(tmp_path / "s"))
    out = _vlm("export-hf", str(tmp_path / "s"), "-o", str(tmp_path / "hf"))
    assert "AutoModel" in out
    ours = load_session(tmp_path / "s").model.eval()
    theirs = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == "SiglipModel"
    torch.manual_seed(0)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(3, 200, (3, ours.max_positions))
    with torch.no_grad():
        want = theirs(pixel_values=px, input_ids=ids).logits_per_image
        got = ours.logits(px, ids, torch.ones_like(ids))
    assert float((got - want).abs().max()) < 1e-5
    assert float(ours.contrastive.logit_bias.detach()) == -10.0  # the spec's initial bias, not uninitialised memory

    _vlm("build", CLIP, "-o", str(tmp_path / "c"))
    r = CliRunner().invoke(app, ["export-hf", str(tmp_path / "c"), "-o", str(tmp_path / "chf")])
    assert r.exit_code != 0 and "E0586" in r.output and "argmax" in r.output, r.output


@pytest.mark.slow
def test_tiny_clip_learns_zero_shot_colours_from_scratch(tmp_path: Path) -> None:
    """400 steps of batch 32 on 1,000 synthetic pairs (~15 s on 2 cores), then zero-shot colour classification
    of 120 held-out images from the CLI. Chance is 1/6 = 16.7 %; seen: 80.8 % with the prompt `a {label} shape`
    (with the default `a photo of a {label}.`, which reads less like the training captions, 55-60 %).
    Asserted: >= 3x chance (50 %)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the figure above is at 2 threads (at 1, after an earlier test leaked it: 59 %)
    try:
        _learn_zero_shot(tmp_path)
    finally:
        torch.set_num_threads(before)


def _learn_zero_shot(tmp_path: Path) -> None:
    data = tmp_path / "syn"
    _vlm("data", "synth", "-o", str(data), "--n", "1000", "--test", "120", "--size", "32")
    run = tmp_path / "run"
    _vlm("train", CLIP, "--data", str(data), "-o", str(run), "--steps", "400")
    out = _vlm("eval", str(run / "final"), "--task", "zero_shot", "--data", str(data / "test_zero_shot.jsonl"),
               "--prompt", "a {label} shape", "-o", str(tmp_path / "zs.json"))
    acc = float(re.search(r"zero_shot_accuracy ([\d.]+)%", out).group(1))
    metrics = json.loads((tmp_path / "zs.json").read_text())["metrics"]
    assert metrics["classes"] == 6 and metrics["images"] == 120
    assert acc == pytest.approx(metrics["zero_shot_accuracy"], abs=0.01)
    print(out)
    assert acc >= 3 * 100 / 6, out

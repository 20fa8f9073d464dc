"""`vlm train --resume` after the stage schedule changed: says what changed, carries on where that is sound
(a stage in progress takes new steps and rates), refuses where the run no longer fits the text. And a
run checks every stage's data before the first stage trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmspec.compiler.compile import load_analysis
from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.inputs.synth import synthesize
from vlmspec.runtime.train import Trainer, TrainOptions

SPEC = """
model tiny {{
  vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 }}
  connector proj = mlp(clip -> llm) {{ layers = 2 }}
  language llm = llama {{ width = 48  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = 400  max_positions = 128 }}
  fusion prefix(proj -> llm)
  stage align {{ train proj  freeze clip, llm  optim adamw(lr = {lr})  batch 4  steps {steps}
                data captions("captions.jsonl")  precision fp32  warmup = 0 }}
{extra}}}
"""


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    synthesize(d, n_train=16, n_test=2, size=32, seed=1)
    return d


def _trainer(tmp: Path, data: Path, log: list[str], *, lr: str = "1e-3", steps: int = 6, extra: str = "",
             resume: bool = False) -> Trainer:
    spec = tmp / "tiny.vlm"
    spec.write_text(SPEC.format(lr=lr, steps=steps, extra=extra))
    analysis, _ = load_analysis(str(spec))
    opts = TrainOptions(run_dir=tmp / "run", data=str(data), resume=resume, save_every=2, log=log.append)
    return Trainer(analysis, opts, spec.read_text(), str(spec))


def _interrupt_after_first_checkpoint(monkeypatch) -> None:
    real = Trainer._checkpoint

    def once(self, *a, **kw):
        real(self, *a, **kw)
        raise Interrupted

    monkeypatch.setattr(Trainer, "_checkpoint", once)


def _code(e: pytest.ExceptionInfo) -> str:
    return e.value.diagnostics[0].code


def test_stage_in_progress_takes_new_steps_and_rate(tmp_path, data, monkeypatch) -> None:
    _interrupt_after_first_checkpoint(monkeypatch)
    with pytest.raises(Interrupted):
        _trainer(tmp_path, data, []).run()
    monkeypatch.undo()
    log: list[str] = []
    _trainer(tmp_path, data, log, lr="5e-4", steps=4, resume=True).run()
    assert "stage align: optim.lr 0.001 -> 0.0005, steps 6 -> 4" in log
    assert "stage align: resumed at step 2/4" in log
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["stages"][0]["steps"] == 4 and manifest["stages"][0]["definition"]["steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # steps 3 and 4 run at the new peak rate on the new cosine (total 4): 5e-4 * (1 + cos(pi * k / 4)) / 2
    import math

    for r in rows[2:]:
        assert r["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * r["step"] / 4)))
    assert rows[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 6)))


def test_refusals(tmp_path, data) -> None:
    _trainer(tmp_path, data, [], steps=2).run()
    with pytest.raises(UserInputError) as e:  # not asked to resume
        _trainer(tmp_path, data, [], steps=3).run()
    assert _code(e) == "E0532"
    with pytest.raises(UserInputError) as e:  # a finished stage cannot take a new definition
        _trainer(tmp_path, data, [], steps=3, resume=True).run()
    assert _code(e) == "E0537" and "steps 2 -> 3" in e.value.diagnostics[0].message
    extra = "  stage more { train proj  freeze clip, llm  batch 4  steps 2  data captions(\"captions.jsonl\") }\n"
    with pytest.raises(UserInputError) as e:  # the stage list is what the run is made of
        _trainer(tmp_path, data, [], steps=2, extra=extra, resume=True).run()
    assert _code(e) == "E0536"


def test_every_stage_data_is_checked_before_the_first_stage(tmp_path, data) -> None:
    (tmp_path / "broken.jsonl").write_text('{"image": "images/missing.png", "caption": "a shape"}\n')
    extra = f'  stage more {{ train proj  freeze clip, llm  batch 4  steps 2  data captions("{tmp_path}/broken.jsonl") }}\n'
    with pytest.raises(UserInputError) as e:
        _trainer(tmp_path, data, [], steps=2, extra=extra).run()
    assert _code(e) == "E0520" and "broken.jsonl" in e.value.diagnostics[0].message
    assert not (tmp_path / "run" / "stages" / "01-align" / "weights.safetensors").exists()  # nothing trained

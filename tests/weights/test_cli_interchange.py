"""`vlm import-hf` -> `vlm check` / `vlm build` -> the same logits as transformers; `vlm export-hf` back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from hf_tiny import IMAGE_TOKEN, assert_sees_image, llava, loaded
from typer.testing import CliRunner

from vlmspec.cli import app

runner = CliRunner()


def test_import_build_export_from_the_cli(tmp_path: Path) -> None:
    hf = llava(transformers, tmp_path / "hf")
    spec = tmp_path / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(tmp_path / "hf"), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["check", str(spec)]).exit_code == 0
    assert runner.invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0  # written in canonical form
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    assert "matches" in r.output and "missing" in r.output.lower()  # the coverage report is printed
    model, _ = loaded(tmp_path / "built")
    assert model.image_token_id == IMAGE_TOKEN
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), IMAGE_TOKEN), torch.randint(2, 99, (1, 8))], 1)
    px = torch.randn(1, 3, 32, 32)
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p).logits, px)
    with torch.no_grad():
        ours = model(ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
    assert (ours - ref).abs().max() <= 1e-4
    r = runner.invoke(app, ["export-hf", str(tmp_path / "built"), "-o", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    again = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        back = again(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits
    assert (back - ref).abs().max() <= 1e-4
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llava"


def test_import_errors_are_one_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["import-hf", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.vlm")])
    assert r.exit_code == 1 and "error[E0580]" in r.output and "Traceback" not in r.output
    assert "does not exist" in r.output

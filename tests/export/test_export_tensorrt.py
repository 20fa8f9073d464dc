"""TensorRT engines from the exported halves (CUDA + torch_tensorrt only): the same greedy tokens as
eager. Without them the test is skipped with the reason printed (`pytest -ra`); the refusal itself is
tested in test_export_errors.py."""

from __future__ import annotations

import pytest
import torch
from export_helpers import SPECS, build, pixels, prompts

from vlmspec.runtime.checkpoint import save_model_dir
from vlmspec.runtime.export.to_tensorrt import tensorrt_missing

LACKS = tensorrt_missing()


@pytest.mark.skipif(bool(LACKS), reason="TensorRT export needs CUDA and torch_tensorrt; here: " + "; ".join(LACKS))
def test_tensorrt_engines_generate_like_eager(tokenizer, tmp_path):
    from vlmspec.runtime.export import ExportedModel, export_model
    from vlmspec.runtime.inputs.processor import Processor

    ref = f"{SPECS / 'llava-1.5-7b.vlm'}:llava_1_5_7b_tiny"
    analysis, model = build(ref, tokenizer)
    folder = save_model_dir(model, analysis, tmp_path / "model", tokenizer=tokenizer)
    manifest = export_model(folder, tmp_path / "out", ["onnx", "tensorrt"], max_len=128, max_batch=4)
    assert set(manifest["artefacts"]["tensorrt"]) == {"encoder", "prefill", "decode"}
    ids, mask = prompts(Processor(analysis, tokenizer))
    px = pixels(manifest, ids.shape[0])
    want = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)
    got = ExportedModel(tmp_path / "out", "tensorrt").generate(ids, mask, px, max_new_tokens=8)
    assert torch.equal(got.cpu(), want)

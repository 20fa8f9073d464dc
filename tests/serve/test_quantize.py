"""`quantize = int8` on the language model: less memory, the same greedy answers."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmspec.compiler.compile import check_file
from vlmspec.runtime.model import build_model
from vlmspec.runtime.quantize import apply_quantization, model_bytes

SPEC = """
model small {
  vision clip = vit { image_size = 32  patch_size = 8  width = 64  depth = 2  heads = 4 }
  connector proj = mlp(clip -> llm)
  language llm = llama { width = 256  depth = 4  heads = 8  kv_heads = 4  ffn = 512  vocab = 512  quantize = int8 }
  fusion prefix(proj -> llm)
}
"""


def test_int8_language_model(tmp_path: Path) -> None:
    path = tmp_path / "small.vlm"
    path.write_text(SPEC)
    analysis = check_file(str(path)).analyses[0]
    torch.manual_seed(0)
    model = build_model(analysis).eval()
    ids = torch.randint(0, 500, (20, 12))
    prompts = torch.cat([torch.full((20, 16), model.image_token_id), ids], dim=1)
    pixels = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        base = model.generate(prompts, pixel_values=pixels, max_new_tokens=8)
    before = model_bytes(model.components["llm"])
    done = apply_quantization(model, analysis)
    after = model_bytes(model.components["llm"])
    assert done == {"llm": 4 * 7 + 1}  # q, k, v, o, gate, up, down per layer, and the head
    assert after < 0.6 * before, (before, after)
    with torch.no_grad():
        quant = model.generate(prompts, pixel_values=pixels, max_new_tokens=8)
    agree = sum(bool(torch.equal(a, b)) for a, b in zip(base, quant, strict=True))
    print(f"int8 llm: {after / before:.3f}x the fp32 bytes; {agree}/20 greedy continuations identical")
    assert agree >= 16


def test_a_quantized_spec_builds_and_trains_to_folders_that_load_quantized(tmp_path: Path) -> None:
    """`vlm build` / `vlm train` of a spec with `quantize = int8` write the weights unquantized (a folder
    holds what the spec quantizes on load; they crashed saving torchao tensors), and `vlmspec.load`
    quantizes them again: the same weights and greedy answers as the session built in memory."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    import vlmspec
    from vlmspec.cli import app
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.session import build_session

    spec = tmp_path / "small.vlm"
    spec.write_text(SPEC)
    runner = CliRunner()
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    fresh = build_session(load_analysis(str(spec))[0], seed=0, quantize=False)
    saved = load_file(str(tmp_path / "built" / "model.safetensors"))
    assert all(torch.equal(saved[f"components.llm.{k}"], v)
               for k, v in fresh.model.components["llm"].state_dict().items())
    loaded = vlmspec.load(str(tmp_path / "built"))
    weight = loaded.model.components["llm"].model.layers[0].self_attn.q_proj.weight
    assert type(weight) is not torch.Tensor  # quantized on load
    in_memory = build_session(load_analysis(str(spec))[0], seed=0)
    prompts = ["a red circle", "what is it?"]
    assert answer(loaded, prompts, max_new_tokens=6) == answer(in_memory, prompts, max_new_tokens=6)

    # a stage that trains the connector beside the frozen, quantized language model
    staged = SPEC.replace("fusion prefix(proj -> llm)\n", """fusion prefix(proj -> llm)
  stage align {
    train proj
    freeze clip, llm
    optim adamw(lr = 1e-3)
    data captions("DATA")
    batch 2
    steps 2
  }
""").replace("DATA", str(tmp_path / "captions.jsonl"))
    spec.write_text(staged)
    runner.invoke(app, ["data", "synth", "-o", str(tmp_path), "--n", "4", "--test", "1", "--size", "32"])
    r = runner.invoke(app, ["train", str(spec), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    trained = vlmspec.load(str(tmp_path / "run" / "final"))
    assert type(trained.model.components["llm"].model.layers[0].self_attn.q_proj.weight) is not torch.Tensor
    assert answer(trained, ["a red circle"], max_new_tokens=4)

"""`vlm train` does what the spec says about weights and learning rates (issue: a spec means what it says).

- Components that name `weights = "DIR"` train from those weights: frozen towers leave a run bit for bit
  as the checkpoint folders hold them, and a LoRA stage moves exactly the tensors it targets.
- A learning rate given to a sub-path applies to that sub-path only (`train llm, llm.attn(lr = 1e-12)`),
  and `fusion(lr = ...)` reaches the fusion components.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlmspec.cli import app
from vlmspec.runtime.inputs.synth import synthesize

transformers = pytest.importorskip("transformers")

VOCAB = 400  # a byte-level BPE needs its 256 bytes plus merges


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A tiny SigLIP vision tower and a tiny Qwen2 language model, saved as Hugging Face folders, with
    every norm and bias randomised so that nothing equals its init by accident."""
    root = tmp_path_factory.mktemp("hf")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    vis = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, vision_use_head=False))
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    with torch.no_grad():
        for m in (vis, lm):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    vis.save_pretrained(str(root / "siglip"))
    lm.save_pretrained(str(root / "qwen2"))
    synthesize(root / "data", n_train=24, n_test=4, size=32, seed=1)
    return root


def _spec(root: Path, stage: str, fusion: str = "fusion prefix(proj -> llm)") -> str:
    return f"""model m {{
  vision enc = siglip {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64
                        weights = "{root / 'siglip'}" }}
  connector proj = mlp(enc -> llm)
  language llm = llama {{ width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 96  vocab = {VOCAB}
                         max_positions = 128  qkv_bias = true  weights = "{root / 'qwen2'}" }}
  {fusion}
  prompt = "{{image}}\\n{{q}} Answer:"
  stage s {{ {stage}  optim adamw(lr = 1e-3)  batch 4  steps 3  data llava("train.json")  precision fp32  warmup = 0 }}
}}
"""


def _train(tmp: Path, root: Path, text: str) -> dict[str, torch.Tensor]:
    spec = tmp / "m.vlm"
    spec.write_text(text)
    r = CliRunner().invoke(app, ["train", str(spec), "-o", str(tmp / "run"), "--data", str(root / "data")])
    assert r.exit_code == 0, r.output
    return load_file(str(tmp / "run" / "final" / "model.safetensors"))


def _reference(root: Path) -> dict[str, torch.Tensor]:
    """The folders' tensors under the run's names (`components.enc.*`, `components.llm.*`)."""
    vis = load_file(str(root / "siglip" / "model.safetensors"))
    lm = load_file(str(root / "qwen2" / "model.safetensors"))
    out = {f"components.enc.{k.removeprefix('vision_model.')}": v for k, v in vis.items()}
    out.update({f"components.llm.{k}": v for k, v in lm.items()})
    return out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_frozen_towers_stay_the_folders_tensors(tmp_path, folders) -> None:
    final = _train(tmp_path, folders, _spec(folders, "train proj  freeze enc, llm"))
    ref = _reference(folders)
    towers = [k for k in final if k.startswith(("components.enc.", "components.llm."))]
    assert towers and set(towers) == set(ref)  # every tower tensor is the folder's, none is left out
    for k in towers:
        assert torch.equal(final[k], ref[k]), k
    # the projector did train (from its seeded init)
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    assert max(_diff(final[k], init[k]) for k in final if k.startswith("components.proj.")) > 1e-4
    # the run's starting point holds the loaded weights too
    assert all(torch.equal(init[k], ref[k]) for k in towers)


def test_lora_stage_moves_only_its_targets(tmp_path, folders) -> None:
    final = _train(tmp_path, folders, _spec(
        folders, "train proj  lora llm(rank = 4, targets = [attn.q, attn.v])  freeze enc"))
    ref = _reference(folders)
    targeted = {k for k in ref if k.startswith("components.llm.") and k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(targeted) == 4
    for k, v in ref.items():
        if k in targeted:
            assert _diff(final[k], v) > 0, f"{k} was not adapted"
        else:
            assert torch.equal(final[k], v), k


def test_sub_path_rate_applies_to_that_path_only(tmp_path, folders) -> None:
    final = _train(tmp_path, folders, _spec(folders, "train proj, llm, llm.attn(lr = 1e-12)  freeze enc"))
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    llm = [k for k in final if k.startswith("components.llm.model.layers.")]
    attn = [k for k in llm if ".self_attn." in k]
    mlp = [k for k in llm if ".mlp." in k]
    assert attn and mlp
    assert max(_diff(final[k], init[k]) for k in mlp) > 1e-4  # the MLP trains at the optimizer's rate
    assert max(_diff(final[k], init[k]) for k in attn) < 1e-6  # the attention at 1e-12


def test_fusion_rate_reaches_the_fusion(tmp_path, folders) -> None:
    text = _spec(folders, "train proj, fusion(lr = 1e-12)  freeze enc, llm",
                 fusion="fusion cross_attention(proj -> llm) { every = 1 }")
    final = _train(tmp_path, folders, text)
    init = load_file(str(tmp_path / "run" / "init.safetensors"))
    fusion = [k for k in final if k.startswith("components.cross_attention.")]
    assert fusion
    assert max(_diff(final[k], init[k]) for k in fusion) < 1e-6  # at 1e-12, not the optimizer's 1e-3
    gates = [k for k in fusion if "gate" in k]
    assert gates and max(_diff(final[k], init[k]) for k in gates) > 0  # trained all the same (not frozen)


def test_build_bundles_the_language_models_tokenizer(tmp_path, folders) -> None:
    """A language model folder that ships a tokenizer gives it to `vlm build`, so `vlm generate` on the
    built folder reads prompts with no --tokenizer flag, and answers as the session does in Python."""
    import shutil

    from vlmspec.runtime.inference import answer
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.session import load_session

    lm = tmp_path / "qwen2"
    shutil.copytree(folders / "qwen2", lm)
    train_tokenizer(corpus(), VOCAB).save_pretrained(str(lm))
    spec = tmp_path / "m.vlm"
    spec.write_text(_spec(folders, "train proj  freeze enc, llm").replace(str(folders / "qwen2"), str(lm)))
    runner = CliRunner()
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "built" / "tokenizer.json").is_file() and "tokenizer" in r.output
    image = sorted((folders / "data" / "images").glob("*.png"))[0]
    r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", str(image), "--prompt",
                            "What color is the shape?", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    want = answer(load_session(tmp_path / "built"), ["What color is the shape?"], [str(image)], max_new_tokens=4)
    assert r.stdout.rstrip("\n") == want[0]


def test_a_tokenizer_that_disagrees_with_the_spec_is_refused(tmp_path, folders) -> None:
    """With a pretrained language model, the spec's `image_token_id` (what `vlm import-hf` reads from the
    checkpoint) and the tokenizer's image token must be the same id: the model learned that row."""
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    tok = tmp_path / "tok"
    train_tokenizer(corpus(), VOCAB).save_pretrained(str(tok))
    spec = tmp_path / "m.vlm"
    spec.write_text(_spec(folders, "train proj  freeze enc, llm").replace('prompt = ', 'image_token_id = 3\n  prompt = '))
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "built"), "--tokenizer", str(tok)])
    assert r.exit_code == 1 and "E0538" in r.output and "image_token_id = 3" in r.output

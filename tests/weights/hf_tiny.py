"""Tiny Hugging Face VLMs, built from configs and saved with `save_pretrained` (no network), and the
import of such a folder through vlmspec that every parity test starts from."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = 100
NQ = 4


def _quiet(transformers) -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def llava(transformers, out: Path, *, layer: int | list[int] = -2, tie: bool = False, kv_heads: int = 2,
          seed: int = 0):
    _quiet(transformers)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tie),
        image_token_id=IMAGE_TOKEN, image_seq_length=16, vision_feature_select_strategy="default",
        vision_feature_layer=layer, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    m.save_pretrained(str(out))
    return m


def blip_configs() -> dict:
    """The tiny vision / Q-Former / OPT sub-configs BLIP-2 and InstructBLIP share."""
    return dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=NQ, image_token_id=IMAGE_TOKEN)


def blip2(transformers, out: Path, seed: int = 0):
    _quiet(transformers)
    cfg = transformers.Blip2Config(**blip_configs())
    torch.manual_seed(seed)
    m = transformers.Blip2ForConditionalGeneration(cfg).eval()
    m.save_pretrained(str(out))
    return m


def imported(folder: Path, tmp: Path, name: str = "model.vlm"):
    """`import_hf` + `build_with_weights`: (model, coverage report, mapping); mapping["spec"] is the text."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights, import_hf

    text, mapping = import_hf(folder)
    spec = tmp / name
    spec.write_text(text)
    analysis, _ = load_analysis(f"{spec}:{mapping['model']}")
    model, report = build_with_weights(analysis, image_token_id=mapping["image_token_id"])
    return model, report, {**mapping, "spec": text}


def randomise(model, fresh: tuple[str, ...], perturbed: tuple[str, ...] = ("norm",)) -> None:
    """Draw parameters whose name contains one of `fresh` anew from N(0, 1) (transformers starts gates at 0,
    which would hide the branches they gate) and nudge those matching `perturbed` (norms start at 1)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f in name for f in fresh) and not any(f in name for f in perturbed):
                p.copy_(torch.randn_like(p))
            elif any(f in name for f in perturbed):  # (`latents_layer_norm` is a norm)
                p.add_(0.2 * torch.randn_like(p))


def refusal(folder: Path, config: dict):
    """The diagnostic `import_hf` raises for a folder holding only this config.json."""
    import json

    import pytest

    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.weights import import_hf

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError) as e:
        import_hf(folder)
    return e.value.diagnostics[0]


def built(text: str, mapping: dict, tmp: Path, name: str):
    """Build an (edited) imported spec with the checkpoint's weights."""
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.weights import build_with_weights

    spec = tmp / name
    spec.write_text(text)
    analysis, _ = load_analysis(f"{spec}:{mapping['model']}")
    return build_with_weights(analysis, image_token_id=mapping["image_token_id"])[0]


def cli_round_trip(hf_dir: Path, tmp: Path):
    """`vlm import-hf` -> `vlm check` / `vlm fmt --check` -> `vlm build` -> `vlmspec.load`: the model."""
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.runtime.checkpoint import load

    runner = CliRunner()
    spec = tmp / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(hf_dir), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["check", str(spec)]).exit_code == 0
    assert runner.invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0  # written in canonical form
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp / "built")])
    assert r.exit_code == 0, r.output
    return load(str(tmp / "built"))

"""A spec that names a checkpoint (`weights = "DIR"`) must say what the checkpoint's config says where no
shape would show the difference (E0587): a rotary base, an RMSNorm epsilon, an activation. Otherwise the
weights load and the model silently computes something the checkpoint was not trained to compute."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import llava, randomise  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlmspec.cli import app  # noqa: E402

runner = CliRunner()

LM = ("width = 64  depth = 2  heads = 4  kv_heads = 2  ffn = 128  vocab = 128  max_positions = 256  "
      "tie_embeddings = false")


def llama_folder(out: Path, *, model_type: str = "llama", **extra) -> Path:
    """A tiny Llama / Mistral saved with `save_pretrained`: rope theta 1e6, RMSNorm eps 1e-5."""
    transformers.utils.logging.set_verbosity_error()
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[model_type]
    cfg = cls[0](vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **extra)
    torch.manual_seed(0)
    model = cls[1](cfg).eval()
    randomise(model)
    model.save_pretrained(str(out))
    return out


def build(tmp: Path, body: str) -> tuple[int, str]:
    spec = tmp / "m.vlm"
    spec.write_text(f"model m {{\n  {body}\n}}\n")
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp / "built")])
    return r.exit_code, r.output


@pytest.mark.parametrize(("fields", "named"), [
    ("norm_eps = 1e-5", "`llm.rope_theta = 10000.0` but"),  # the default base, where the checkpoint's is 1e6
    ("rope_theta = 1e6", "`llm.norm_eps = 1e-06` but"),  # the default epsilon, where the checkpoint's is 1e-5
])
def test_a_language_model_that_differs_from_its_checkpoint_is_refused(tmp_path: Path, fields: str, named: str) -> None:
    folder = llama_folder(tmp_path / "hf")
    code, out = build(tmp_path, f'language llm = llama {{ {LM}  {fields}  weights = "{folder}" }}')
    assert code == 1 and "error[E0587]" in out and named in out and "Traceback" not in out, out
    assert not (tmp_path / "built").exists()
    # saying what the checkpoint says builds, and answers as the checkpoint does
    code, out = build(tmp_path, f'language llm = llama {{ {LM}  norm_eps = 1e-5  rope_theta = 1e6  weights = "{folder}" }}')
    assert code == 0, out
    import vlmspec

    ours = vlmspec.load(str(tmp_path / "built")).model
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(ids).logits).abs().max() < 1e-4


def test_a_mistral_window_shorter_than_its_context_is_refused(tmp_path: Path) -> None:
    """Sliding-window attention is not what a `llama` does: refused when the checkpoint is named directly,
    as `vlm import-hf` refuses it."""
    folder = llama_folder(tmp_path / "hf", model_type="mistral", sliding_window=16)
    code, out = build(tmp_path, f'language llm = llama {{ {LM}  norm_eps = 1e-5  rope_theta = 1e6  weights = "{folder}" }}')
    assert code == 1 and "error[E0585]" in out and "sliding_window = 16" in out, out


def test_a_part_of_a_whole_vlm_checkpoint_is_compared_with_its_import(tmp_path: Path) -> None:
    """A hand-written spec reading LLaVA's projector part with another activation than the checkpoint's."""
    folder = tmp_path / "hf"
    llava(transformers, folder)
    body = (f'vision clip = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64\n'
            f'    feature = layer(-2).patches  weights = "{folder}#vision" }}\n'
            f'  connector proj = mlp(clip -> llm) {{ layers = 2  act = silu  weights = "{folder}#projector" }}\n'
            f'  language llm = llama {{ {LM}  weights = "{folder}#language" }}\n'
            f'  fusion prefix(proj -> llm)')
    code, out = build(tmp_path, body)
    assert code == 1 and "error[E0587]" in out and "`proj.act = silu` but" in out and "act = gelu" in out, out


VISION = "image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64"


@pytest.mark.parametrize(("kind", "make", "wrong", "named", "right"), [
    ("vit", lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")),
     "act = gelu  norm_eps = 1e-5", "`clip.act = gelu` but", "act = quick_gelu  norm_eps = 1e-5"),
    ("siglip", lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, layer_norm_eps=1e-5, vision_use_head=False)),
     "norm_eps = 1e-6", "`clip.norm_eps = 1e-06` but", "norm_eps = 1e-5"),
    ("dinov2", lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8,
        hidden_act="gelu")),
     "act = quick_gelu", "`clip.act = quick_gelu` but", "act = gelu"),
])
def test_a_vision_encoder_that_differs_from_its_checkpoint_is_refused(tmp_path: Path, kind, make, wrong, named,
                                                                      right) -> None:
    """A single-model vision folder fixes the activation and LayerNorm epsilon no tensor shows: a spec that
    says otherwise is refused before anything loads (E0587); saying what the checkpoint says builds."""
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = make().eval()
    randomise(model)
    model.save_pretrained(str(tmp_path / "hf"))
    folder = tmp_path / "hf"
    rest = ("\n  connector proj = mlp(clip -> llm)\n  language llm = llama { width = 32  depth = 1  heads = 2  ffn = 64  "
            "vocab = 64  max_positions = 64 }\n  fusion prefix(proj -> llm)")
    code, out = build(tmp_path, f'vision clip = {kind} {{ {VISION}  {wrong}  weights = "{folder}" }}{rest}')
    assert code == 1 and "error[E0587]" in out and named in out and "Traceback" not in out, out
    code, out = build(tmp_path, f'vision clip = {kind} {{ {VISION}  {right}  weights = "{folder}" }}{rest}')
    assert code == 0, out

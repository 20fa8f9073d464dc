"""Mamba (`MambaForCausalLM`) as the language model of a VLM (Cobra-style: encoder -> MLP -> Mamba, prefix
fusion): a single-model folder (`weights = "DIR"`) gives logits within 1e-4 (fp32) of transformers' on a
left-padded batch and the same 16 greedy tokens with the recurrent cache; a tiny VLM on it builds, answers
from the CLI (depending on the image) and trains a stage; `vlm summary` counts mamba-2.8b as transformers
does; the fusions a Mamba cannot host are refused at their span (E0245)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import _quiet, assert_sees_image, loaded, noise_image, randomise  # noqa: E402

from vlmspec.cli import app  # noqa: E402
from vlmspec.compiler.compile import check_file, load_analysis  # noqa: E402
from vlmspec.runtime.weights import build_with_weights  # noqa: E402
from vlmspec.runtime.weights.spec_text import language_block  # noqa: E402

transformers = pytest.importorskip("transformers")
runner = CliRunner()

VOCAB = 512  # room for the tokenizer the CLI tests train (400 tokens and `<image>`)
# name -> MambaConfig overrides: every flag that changes a shape or a computation, both ways
CONFIGS = {
    "untied": dict(tie_word_embeddings=False, time_step_rank=4),
    "tied_no_conv_bias": dict(tie_word_embeddings=True, use_conv_bias=False, conv_kernel=3, state_size=4),
    "biased_projections": dict(tie_word_embeddings=False, use_bias=True, expand=3, layer_norm_epsilon=1e-3),
}


def mamba(out: Path, name: str = "untied", seed: int = 0):
    """A randomised tiny `MambaForCausalLM` saved to `out` (A_log drawn fresh: its init is a fixed ramp);
    returns (model, config.json)."""
    _quiet(transformers)
    cfg = transformers.MambaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2), **CONFIGS[name]})
    torch.manual_seed(seed)
    m = transformers.MambaForCausalLM(cfg).eval()
    randomise(m, fresh=("A_log",), seed=seed)
    m.save_pretrained(str(out))
    return m, json.loads((out / "config.json").read_text())


def spec_text(block: str, fusion: str = "fusion prefix(proj -> llm)", stages: str = "") -> str:
    return f"""model m {{
  vision enc = vit {{ image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64 }}
  connector proj = mlp(enc -> llm)
{block}
  {fusion}
{stages}}}
"""


def text_ids(rows: int = 2, pad: int = 3):
    ids = torch.randint(3, 120, (rows, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_model_folder_parity(tmp_path, name):
    """Every key loaded, the same parameter count as transformers (and as the compiler's formula), logits
    within 1e-4, 16 greedy tokens identical with the cache and without it."""
    hf, config = mamba(tmp_path / "hf", name)
    block = language_block(config, str(tmp_path / "hf"), config["tie_word_embeddings"])
    assert "= mamba {" in block
    (tmp_path / "m.vlm").write_text(spec_text(block))
    analysis = load_analysis(f"{tmp_path / 'm.vlm'}:m")[0]
    model, report = build_with_weights(analysis)
    cov = report.components["llm"]
    assert cov.status == "loaded" and not cov.missing and not cov.unexpected and not cov.mismatched, str(report)
    llm = model.components["llm"]
    count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in llm.parameters()) == count == analysis.shapes.total("llm")
    if config["tie_word_embeddings"]:
        assert llm.lm_head.weight is llm.backbone.embeddings.weight
    ids, mask = text_ids()
    # Hugging Face masks padding before in_proj, so with in_proj biases its padded rows differ: compare unpadded
    if config["use_bias"]:
        mask = torch.ones_like(mask)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
        diff = float((ref[real] - out[real]).abs().max())
        assert diff <= 1e-4, diff
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16), want)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, use_cache=False), want)


def test_left_padding_does_not_change_a_row(tmp_path):
    """A padded row's logits and greedy tokens are its unpadded row's: padding feeds zeros to the conv and scan."""
    mamba(tmp_path / "hf", "biased_projections")  # in_proj biases: padding must be masked after in_proj
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "m.vlm").write_text(spec_text(language_block(config, str(tmp_path / "hf"), False)))
    model, _ = build_with_weights(load_analysis(f"{tmp_path / 'm.vlm'}:m")[0])
    ids, mask = text_ids(pad=4)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits[1, 4:]
        alone = model(ids[1:, 4:]).logits[0]
    assert float((batch - alone).abs().max()) <= 1e-5
    together = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(together[1:], model.generate(ids[1:, 4:], max_new_tokens=12))
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3)
    assert torch.equal(beams, model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                                             use_cache=False))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The synthetic shapes data from the CLI (`vlm data synth`), as tests/train/conftest.py makes it."""
    out = tmp_path_factory.mktemp("synth") / "shapes"
    r = runner.invoke(app, ["data", "synth", "-o", str(out), "--n", "16", "--test", "4", "--size", "48"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def cobra_like(tmp_path) -> Path:
    """A tiny Cobra-style spec: ViT -> MLP -> a Mamba folder (with a tokenizer trained on the synthetic corpus,
    `<image>` among its tokens), prefix fusion, and one training stage."""
    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer

    hf_dir = tmp_path / "hf"
    mamba(hf_dir, "untied", seed=2)
    train_tokenizer(corpus(), 400, extra_special=["<image>"]).save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    stages = """  stage align {
    train proj
    lora llm(rank = 4)
    freeze enc
    optim adamw(lr = 1e-3)
    data llava("train.json")
    batch 4
    steps 2
    precision fp32
    activation_checkpointing = [llm]
  }
"""
    spec = tmp_path / "cobra.vlm"
    spec.write_text(spec_text(language_block(config, str(hf_dir), False), stages=stages))
    return spec


def test_cli_build_and_generate_see_the_image(cobra_like, tmp_path):
    """`vlm build` -> `vlm generate --image` on non-square images: the answers are what the built model
    generates in Python, whose logits move with the image."""
    built = tmp_path / "built"
    r = runner.invoke(app, ["build", f"{cobra_like}:m", "-o", str(built)])
    assert r.exit_code == 0, r.output
    model, processor = loaded(built)
    for name, size in (("wide.png", (52, 30)), ("tall.png", (21, 47))):
        image = noise_image(tmp_path / name, size, colour=True)
        r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", "What colour is it?",
                                "--max-new-tokens", "8"])
        assert r.exit_code == 0, r.output
        batch = processor.generation_batch(["What colour is it?"], [str(image)])
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=8)
        assert r.stdout.strip() == processor.decode(tokens[0].tolist()).strip()
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert_sees_image(lambda p: model(ids, attention_mask=mask, pixel_values=p).logits, px)


def test_a_stage_trains(cobra_like, shapes, tmp_path):
    """`vlm train` runs the stage (the connector trained, LoRA on the Mamba's projections, its layers recomputed in
    the backward pass) and the result answers."""
    r = runner.invoke(app, ["train", f"{cobra_like}:m", "--data", str(shapes), "-o", str(tmp_path / "run"),
                            "--steps", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "run" / "final"), "--image", str(next(shapes.rglob("*.png"))),
                            "--prompt", "What colour is the shape?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


def test_summary_counts_mamba_2_8b_as_transformers(tmp_path):
    """`vlm summary` of a mamba-2.8b language model == `MambaForCausalLM`'s parameters on the meta device."""
    cfg = transformers.MambaConfig(hidden_size=2560, num_hidden_layers=64, vocab_size=50280)
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(cfg)
    want = sum(p.numel() for p in hf.parameters())  # tied head: counted once
    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text("  language llm = mamba { width = 2560  depth = 64  vocab = 50280 }"))
    analysis = load_analysis(f"{spec}:m")[0]
    assert analysis.shapes.total("llm") == want
    r = runner.invoke(app, ["summary", "--json", f"{spec}:m"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["params"]["by_component"]["llm"] == want == 2_768_345_600


@pytest.mark.parametrize("fusion, what", [
    ("fusion visual_expert(proj -> llm)", "`visual_expert`"),
    ("fusion cross_attention(proj -> llm) { every = 1 }", "`cross_attention`"),
    ("fusion moe(proj -> llm)", "`moe`"),
    ("fusion prefix(proj -> llm) { prefix_attention = bidirectional }", "bidirectional prefix"),
])
def test_fusions_a_mamba_cannot_host_are_located_errors(tmp_path, fusion, what):
    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text("  language llm = mamba { width = 32  depth = 2  vocab = 128 }", fusion))
    result = check_file(str(spec))
    codes = [d.code for d in result.diagnostics]
    assert codes == ["E0246" if "prefix(" in fusion else "E0245"], [str(d) for d in result.diagnostics]
    d = result.diagnostics[0]
    assert what in d.message and "mamba" in d.message and d.span is not None and d.span.line == 5


@pytest.mark.parametrize("attr", ["heads = 4", "kv_heads = 2", "rope = default", "ffn = 64", "rope_theta = 1e4"])
def test_attention_attributes_are_not_fields_of_mamba(tmp_path, attr):
    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text(f"  language llm = mamba {{ width = 32  depth = 2  vocab = 128  {attr} }}"))
    result = check_file(str(spec))
    d = result.diagnostics[0]
    assert d.code == "E0104" and d.span is not None and attr.split()[0] in d.message


def test_packing_and_bad_lora_targets_are_refused(tmp_path):
    """A scan carries its state across a packed row (E0235); LoRA targets name the mixer's projections."""
    block = "  language llm = mamba { width = 32  depth = 2  vocab = 128 }"
    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text(block, stages="  stage s { train proj  freeze enc, llm  packing = true }\n"))
    assert [d.code for d in check_file(str(spec)).diagnostics] == ["E0235"]
    spec.write_text(spec_text(block, stages="  stage s { train proj  freeze enc  lora llm(rank = 4, targets = [attn.q]) }\n"))
    d = check_file(str(spec)).diagnostics[0]
    assert d.code == "E0403" and "mixer.in_proj" in (d.help or "")
    spec.write_text(spec_text(block, stages="  stage s { freeze enc, proj  lora llm(rank = 4, targets = [mixer.x_proj]) }\n"))
    analysis = load_analysis(f"{spec}:m")[0]
    assert analysis.plans[0].lora_params == 2 * 4 * (64 + 2 + 2 * 16)  # depth x rank x (in + out)


def test_unsupported_checkpoint_settings_are_refused():
    from vlmspec.diagnostics import UserInputError

    with pytest.raises(UserInputError) as e:
        language_block({"model_type": "mamba", "hidden_size": 32, "hidden_act": "gelu"}, "DIR", True)
    assert e.value.diagnostics[0].code == "E0585" and "activation gelu" in e.value.diagnostics[0].message


def test_original_checkpoint_keys_load(tmp_path):
    """state-spaces' own checkpoints spell the embedding `backbone.embedding`: the second layout reads them."""
    from safetensors.torch import load_file, save_file

    hf, config = mamba(tmp_path / "hf", "untied")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, str(path), metadata={"format": "pt"})
    (tmp_path / "m.vlm").write_text(spec_text(language_block(config, str(tmp_path / "hf"), False)))
    model, report = build_with_weights(load_analysis(f"{tmp_path / 'm.vlm'}:m")[0])
    assert report.components["llm"].status == "loaded", str(report)
    assert torch.equal(model.components["llm"].backbone.embeddings.weight, hf.backbone.embeddings.weight)


def test_export_is_refused_with_its_reason(cobra_like, tmp_path):
    built = tmp_path / "built"
    assert runner.invoke(app, ["build", f"{cobra_like}:m", "-o", str(built)]).exit_code == 0
    r = runner.invoke(app, ["export", str(built), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "E0571" in r.output and "mamba" in r.output.lower() and "Traceback" not in r.output


def test_bf16_generation_with_the_cache_equals_recomputing(tmp_path):
    """In bf16 (the residual kept in float32) the cached and recomputed greedy tokens agree."""
    _, config = mamba(tmp_path / "hf", "untied")
    block = language_block(config, str(tmp_path / "hf"), False).replace("  }", "    dtype = bf16\n  }")
    (tmp_path / "m.vlm").write_text(spec_text(block))
    model, _ = build_with_weights(load_analysis(f"{tmp_path / 'm.vlm'}:m")[0])
    assert model.components["llm"].lm_head.weight.dtype == torch.bfloat16
    ids, mask = text_ids()
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=False))


def test_continuous_batching_serves_each_row_as_alone(tmp_path):
    """The server's engine merges and splits running batches by row: a Mamba's states travel with their rows,
    so requests joining and leaving mid-decode get the tokens they get generated alone."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
    from test_continuous import QUESTIONS, _alone, _png, _run

    from vlmspec.runtime.inputs.synth import corpus
    from vlmspec.runtime.inputs.tokenizer import train_tokenizer
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.serve.engine import GenRequest
    from vlmspec.runtime.session import Session

    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text("  language llm = mamba { width = 32  depth = 2  vocab = 512  max_positions = 256 }"))
    analysis = load_analysis(f"{spec}:m")[0]
    tok = train_tokenizer(corpus(), 400, extra_special=("<image>",))
    torch.manual_seed(0)
    session = Session(analysis, build_model(analysis, image_token_id=tok.convert_tokens_to_ids("<image>")).eval(), tok)
    reqs = [GenRequest(q, _png((40 * i, 90, 200)) if i % 3 else None, max_tokens=4 + 2 * i, temperature=0.0)
            for i, q in enumerate(QUESTIONS[:5])]
    engine, widest = _run(session, {0: reqs[:2], 2: [reqs[2]], 3: reqs[3:]})
    assert widest >= 3
    for req in reqs:
        assert req.error is None and req.output_ids == _alone(session, engine, req), req.question


def test_a_checkpoint_with_another_epsilon_is_refused(tmp_path):
    """The spec's `norm_eps` is compared with the folder's config before anything is read (E0587)."""
    from vlmspec.diagnostics import UserInputError

    _, config = mamba(tmp_path / "hf", "untied")
    block = language_block(config, str(tmp_path / "hf"), False).replace("norm_eps = 1e-05", "norm_eps = 1e-06")
    (tmp_path / "m.vlm").write_text(spec_text(block))
    with pytest.raises(UserInputError) as e:
        build_with_weights(load_analysis(f"{tmp_path / 'm.vlm'}:m")[0])
    assert e.value.diagnostics[0].code == "E0587" and "norm_eps" in e.value.diagnostics[0].message


def test_layer_hooks_into_a_mamba_are_a_run_time_error(tmp_path):
    """A model built without the front end's check (E0245) still refuses a fusion inside its layers (E0599)."""
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.decoding import DecodeState
    from vlmspec.runtime.language import LayerHooks
    from vlmspec.runtime.model import build_model

    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text("  language llm = mamba { width = 32  depth = 2  vocab = 128 }"))
    llm = build_model(load_analysis(f"{spec}:m")[0]).components["llm"]
    with pytest.raises(UserInputError) as e:
        llm.decode(torch.zeros(1, 3, 32), DecodeState(None, None, True), [LayerHooks(), LayerHooks()])
    assert e.value.diagnostics[0].code == "E0599"


@pytest.mark.parametrize("block", ["tie_embeddings = false  bias = true", "conv_bias = false  dt_rank = 3"])
def test_spec_paths_agree_with_the_built_model(tmp_path, block):
    """Each sub-path (`llm.mixer`, `llm.head`, ...) covers as many parameters in the built model as the compiler
    counts, and each LoRA target names the mixers' linear layers."""
    from vlmspec.compiler.passes import part_params, valid_paths
    from vlmspec.runtime.model import build_model
    from vlmspec.runtime.spec_paths import ParamTable

    spec = tmp_path / "m.vlm"
    spec.write_text(spec_text(f"  language llm = mamba {{ width = 32  depth = 2  vocab = 128  {block} }}"))
    analysis = load_analysis(f"{spec}:m")[0]
    model = build_model(analysis, device="meta")
    table = ParamTable.of(model, analysis)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for path in [p for p in valid_paths(analysis.ir) if p.startswith("llm")]:
        assert sum(sizes[n] for n in table.covered(path)) == part_params(analysis.ir, analysis.shapes, path), path
    for target in analysis.ir.components["llm"].config.lora_targets():
        assert len(table.lora_modules("llm", [target])) == 2, target

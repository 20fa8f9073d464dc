"""Tiny Hugging Face VLMs, built from configs and saved with `save_pretrained` (no network), and the
import of such a folder through vlmspec that every parity test starts from.

Every reference goes through `randomise` before it is saved (transformers' init leaves norms at 1, biases,
gates and queries at 0: a runtime that dropped any of them would still match), and every parity test
checks with `assert_sees_image` that its reference's logits depend on the pixels before comparing."""

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
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


def blip_configs() -> dict:
    """The tiny vision / Q-Former / OPT sub-configs BLIP-2 and InstructBLIP share. Weights are drawn with
    std 0.1 (the vision config's own default is 1e-10, and at 0.02 the four query tokens move the OPT
    logits by ~3e-4 when the image changes: too little for a parity test to see the image)."""
    init = dict(initializer_range=0.1)
    return dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, **init),
        qformer_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=1, **init),
        text_config=dict(model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1, init_std=0.1, **init),
        num_query_tokens=NQ, image_token_id=IMAGE_TOKEN, **init)


def blip2(transformers, out: Path, seed: int = 0):
    _quiet(transformers)
    cfg = transformers.Blip2Config(**blip_configs())
    torch.manual_seed(seed)
    m = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
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


#: Constant parameters drawn from N(0, 1): tanh gates (0 hides the branch they gate: Mllama's `*_gate`,
#: IDEFICS' `alpha_*`) and learned queries (0 makes every query alike).
FRESH = ("gate", "alpha", "query_tokens")


def randomise(model, fresh: tuple[str, ...] = (), seed: int = 0) -> None:
    """Give every parameter transformers leaves at a constant init random values, seeded, so that a
    runtime which drops one (a norm's weight or bias, an attention bias, the queries) cannot match:
    norm weights (1, Gemma's 0) are nudged by N(0, 0.2), biases drawn from N(0, 0.2), gates and queries
    from N(0, 1), and so is any parameter whose name contains one of `fresh`; rows an embedding keeps at
    zero (the padding row) are drawn like the other rows. Call it after building the reference and
    before saving it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            flat = p.detach().flatten()
            constant = bool((flat == flat[0]).all())
            if any(f in name for f in fresh) or (constant and any(f in name for f in FRESH)):
                p.copy_(noise)
            elif constant:
                p.add_(0.2 * noise)  # 1 -> 1 + N(0, 0.2); 0 -> N(0, 0.2)
            elif p.dim() == 2:
                zero = (p == 0).all(dim=1)
                if bool(zero.any()):
                    p[zero] = noise[zero] * p[~zero].std()
            assert float(p.detach().abs().max()) > 1e-6, f"{name} is still (nearly) zero"


def assert_sees_image(logits_of, px: torch.Tensor, tol: float = 1e-4, real: torch.Tensor | None = None) -> float:
    """The reference's logits move by more than 100 x `tol` when the pixels change (padding stays zero):
    a parity test whose reference ignores the image cannot catch a bug in the encoder or connector.
    `logits_of(pixels)` runs the reference; `real` [b x s] picks the positions compared."""
    other = torch.randn(px.shape, generator=torch.Generator().manual_seed(1234)) * (px != 0)
    with torch.no_grad():
        a, b = logits_of(px), logits_of(other)
    if real is not None:
        a, b = a[real], b[real]
    moved = float((a - b).abs().max())
    assert moved > 100 * tol, f"the reference's logits move by {moved:.2e} when the image changes"
    return moved


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

    runner = CliRunner()
    spec = tmp / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(hf_dir), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["check", str(spec)]).exit_code == 0
    assert runner.invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0  # written in canonical form
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp / "built")])
    assert r.exit_code == 0, r.output
    return loaded(tmp / "built")[0]


def loaded(folder: Path):
    """`vlmspec.load(folder)`: (model in eval mode, its processor or None)."""
    import vlmspec

    session = vlmspec.load(str(folder))
    model = getattr(session, "model", session)  # a Session holds the model; older releases returned it
    return model.eval(), getattr(session, "processor", None)


def export_round_trip(hf_dir: Path, tmp: Path, *, fmt: str | None = None) -> tuple[Path, Path]:
    """`vlm import-hf` -> `vlm build` -> `vlm export-hf` from the CLI, asserting that the export holds the
    checkpoint's tensors bit for bit under the same keys: (the built folder, the export)."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vlmspec.cli import app

    runner = CliRunner()
    spec, built, back = tmp / "imported.vlm", tmp / "built", tmp / "exported"
    for args in (["import-hf", str(hf_dir), "-o", str(spec)], ["build", str(spec), "-o", str(built)],
                 ["export-hf", str(built), "-o", str(back), *(["--format", fmt] if fmt else [])]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    theirs = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        theirs.update(load_file(str(f)))
    ours = load_file(str(back / "model.safetensors"))
    assert sorted(ours) == sorted(theirs), (sorted(set(theirs) - set(ours))[:5], sorted(set(ours) - set(theirs))[:5])
    differ = [k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, differ[:5]
    return built, back


def noise_image(path: Path, size: tuple[int, int], sigma: float = 80.0, colour: bool = False) -> Path:
    """A grey-noise (or `colour`-noise) RGB image of `size` (w, h), the same on every run: seeded by its size (PIL's
    `effect_noise` draws from the C library's unseeded generator, so an image, and with it a test's
    answers, depended on which tests ran before)."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng([w, h])
    pixels = np.clip(128 + sigma * rng.standard_normal((h, w, 3) if colour else (h, w)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert("RGB").save(path)
    return path


def config_subset(ours: dict, theirs: dict, path: str = "") -> list[str]:
    """The keys of `ours` (nested) whose values `theirs` does not hold: an exported config.json against
    the checkpoint's own."""
    out = []
    for k, v in ours.items():
        if isinstance(v, dict) and isinstance(theirs.get(k), dict):
            out += config_subset(v, theirs[k], f"{path}{k}.")
        elif theirs.get(k, v) != v:
            out.append(f"{path}{k}: {v!r} != {theirs.get(k)!r}")
    return out


def laid_out_transform(model):
    """The image transform of a built model's encoder that lays images out (anyres, dynamic tiles, split), as
    the processor makes it from the encoder's config."""
    from vlmspec.runtime.inputs.images import ImageTransform

    vis = next(c for c in model.components.values() if getattr(getattr(c, "cfg", None), "layout", "fixed") != "fixed")
    return ImageTransform.from_encoder(vis.cfg)


def anyres_parity(hf, ours, ids: torch.Tensor, px: torch.Tensor, sizes: torch.Tensor) -> float:
    """An any-resolution model (LLaVA-NeXT, OneVision) against its transformers class on the same tiles and
    image sizes: the reference must see the image; 16 greedy tokens identical; returns the max logit difference."""
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
        got = ours(ids, pixel_values=px, image_sizes=sizes).logits
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=p, image_sizes=sizes).logits, px)
    with torch.no_grad():
        theirs_gen = hf.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, max_new_tokens=16,
                                 do_sample=False)[0, ids.shape[1]:]
        ours_gen = ours.generate(ids, pixel_values=px, image_sizes=sizes, max_new_tokens=16)[0]
    assert ours_gen.tolist()[: len(theirs_gen)] == theirs_gen.tolist()
    return float((ref - got).abs().max())

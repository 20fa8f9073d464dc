"""`clip_text`, `siglip_text` and `feature = pooled` against transformers' towers: every parameter randomised,
the text towers' pooled vectors equal `CLIPTextModel` / `SiglipTextModel`'s `pooler_output` (padded captions
included) and the pooled vision towers equal `CLIPVisionModel` / `SiglipVisionModel`'s, within 1e-5 in fp32;
the spec's preprocessing of a non-square image equals CLIPImageProcessor's (shortest-edge resize + centre
crop) and SiglipImageProcessor's (plain resize); `pooled` on a tower with nothing to pool is a located error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "weights"))
from hf_tiny import _quiet, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB, EOS, LENGTH = 100, 99, 12

CLIP_SPEC = """model m {
  vision img = vit { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64  feature = pooled  fit = crop }
  text txt = clip_text { width = 24  depth = 2  heads = 4  mlp = 48  vocab = 100  max_positions = 16  POOL }
  fusion contrastive(img + txt) { dim = 16 }
}
"""
SIGLIP_SPEC = """model m {
  vision img = siglip { image_size = 32  patch_size = 8  width = 32  depth = 2  heads = 4  mlp = 64  feature = pooled  pool_head = true }
  text txt = siglip_text { width = 24  depth = 2  heads = 4  mlp = 48  vocab = 100  max_positions = 12  projection = 32 }
  fusion contrastive(img + txt) { loss = sigmoid  bias = -10.0 }
}
"""


def ours(text: str, tmp: Path):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.contrastive import build_contrastive

    (tmp / "m.vlm").write_text(text)
    analysis = load_analysis(f"{tmp / 'm.vlm'}:m")[0]
    return analysis, build_contrastive(analysis).eval()


def load_tower(module: torch.nn.Module, hf: torch.nn.Module, prefix: str) -> None:
    """Our tower's keys are the HF tower's (transformers 5 saves a tower model's keys unprefixed)."""
    sd = {k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def captions() -> tuple[torch.Tensor, torch.Tensor]:
    """Three captions, two right-padded (pad id 0), each ending in EOS; ids below EOS elsewhere."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, EOS, (3, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((LENGTH, 7, 4)):
        ids[row, n - 1] = EOS
        ids[row, n:] = 0
        mask[row, n:] = 0
    return ids, mask


def clip_reference(eos: int):
    _quiet(transformers)
    tc = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos,
                                     pad_token_id=0, bos_token_id=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    text, vision = transformers.CLIPTextModel(tc).eval(), transformers.CLIPVisionModel(vc).eval()
    randomise(text)
    randomise(vision, seed=1)
    return text, vision


@pytest.mark.parametrize("pool,eos", [("pool = eos  eos_token_id = 99", EOS), ("pool = argmax", 2)])
def test_clip_towers_match_transformers(tmp_path: Path, pool: str, eos: int) -> None:
    text, vision = clip_reference(eos)
    _, model = ours(CLIP_SPEC.replace("POOL", pool), tmp_path)
    load_tower(model.components["txt"], text, "")
    load_tower(model.components["img"], vision, "")
    ids, mask = captions()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_t = text(input_ids=ids, attention_mask=mask).pooler_output
        got_t = model.components["txt"](ids, mask)
        want_v = vision(pixel_values=px).pooler_output
        got_v = model.components["img"](px).x[:, 0]
    assert got_t.shape == (3, 24) and got_v.shape == (2, 32)
    assert float((got_t - want_t).abs().max()) < TOL
    assert float((got_v - want_v).abs().max()) < TOL


def test_siglip_towers_match_transformers(tmp_path: Path) -> None:
    _quiet(transformers)
    tc = transformers.SiglipTextConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=12, projection_size=32)
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    text, vision = transformers.SiglipTextModel(tc).eval(), transformers.SiglipVisionModel(vc).eval()
    randomise(text)
    randomise(vision, seed=1, fresh=("probe",))
    _, model = ours(SIGLIP_SPEC, tmp_path)
    load_tower(model.components["txt"], text, "")
    load_tower(model.components["img"], vision, "")
    ids, mask = captions()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for m in (None, mask):  # SigLIP pads to max_positions and passes no mask; a mask is honoured too
            want_t = text(input_ids=ids, attention_mask=m).pooler_output
            assert float((model.components["txt"](ids, m) - want_t).abs().max()) < TOL
        want_v = vision(pixel_values=px).pooler_output
        got_v = model.components["img"](px).x[:, 0]
    assert float((got_v - want_v).abs().max()) < TOL


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocessing_matches_the_image_processor(tmp_path: Path, kind: str) -> None:
    from vlmspec.runtime.inputs.encoder_images import transform_for

    analysis, _ = ours(CLIP_SPEC.replace("POOL", "eos_token_id = 99") if kind == "clip" else SIGLIP_SPEC, tmp_path)
    cfg = analysis.ir.components["img"].config
    if kind == "clip":
        proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    from PIL import Image

    img = Image.open(noise_image(tmp_path / "x.png", (53, 37), colour=True))
    want = proc(images=[img], return_tensors="pt")["pixel_values"][0]
    got = transform_for(cfg)(img)
    got = got[0] if isinstance(got, tuple) else got
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < TOL


def test_pooled_without_a_pool_is_a_located_error(tmp_path: Path) -> None:
    from vlmspec.compiler.compile import check_file

    path = tmp_path / "m.vlm"
    path.write_text(SIGLIP_SPEC.replace("  pool_head = true", ""))
    (d,) = [d for d in check_file(str(path)).diagnostics if d.severity == "error"]
    assert d.code == "E0223" and d.span is not None and d.span.line == 2


def test_caption_errors_are_coded(tmp_path: Path) -> None:
    """Captions longer than the learned positions (E0620), and a `pool = eos` caption without the end-of-text
    token (E0621), are user errors, not index errors."""
    from vlmspec.diagnostics import UserInputError

    _, model = ours(CLIP_SPEC.replace("POOL", "eos_token_id = 99"), tmp_path)
    tower = model.components["txt"]
    with pytest.raises(UserInputError, match="E0620|max_positions"):
        tower(torch.full((1, 17), EOS), None)
    with pytest.raises(UserInputError, match="end-of-text"):
        tower(torch.ones(2, 5, dtype=torch.long), None)

"""`pixel_shuffle` against InternVL's and Idefics3's / SmolVLM's: the shuffles' token and channel orders
(one order, reached by three different reshapes), and the whole connector with randomised weights
(InternVL: LayerNorm, Linear, GELU, Linear; Idefics3 / SmolVLM: one Linear without a bias)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import analyse

from vlmspec.compiler.schema.connectors import PixelShuffle
from vlmspec.runtime.blocks import VisualTokens
from vlmspec.runtime.connectors.base import space_to_depth
from vlmspec.runtime.connectors.pixel_shuffle import PixelShuffleConnector
from vlmspec.runtime.model import build_model
from vlmspec.runtime.weights.formats.internvl_parts import projector_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weights"))
from hf_tiny import randomise  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector  # noqa: E402
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector  # noqa: E402
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector  # noqa: E402

D, OUT = 12, 40
#: sub-configs of the tiny references (only the widths matter; the head counts make them valid)
VISION = dict(hidden_size=D, num_attention_heads=2)
TEXT = dict(hidden_size=OUT, num_attention_heads=2, num_key_value_heads=2)


def _tokens(n: int, gh: int, gw: int, d: int = D) -> torch.Tensor:
    return torch.randn(n, gh * gw, d, generator=torch.Generator().manual_seed(gh * 100 + gw))


@pytest.mark.parametrize("grid", [(4, 6), (6, 4), (8, 8), (2, 10)])
def test_internvl_shuffle_is_row_by_row_space_to_depth(grid):
    """InternVL's `pixel_shuffle` (scale 0.5) takes a [n x rows x cols x d] grid, non-square ones too."""
    gh, gw = grid
    x = _tokens(2, gh, gw)
    theirs = transformers.InternVLModel.pixel_shuffle(None, x.view(2, gh, gw, D), scale_factor=0.5)
    assert theirs.shape == (2, gh // 2, gw // 2, 4 * D)
    assert torch.equal(space_to_depth(x, grid, 2), theirs.reshape(2, -1, 4 * D))


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(("side", "scale"), [(4, 2), (6, 3), (8, 4), (12, 3)])
def test_idefics3_shuffle_is_row_by_row_space_to_depth(family, side, scale):
    """Idefics3's / SmolVLM's shuffle reads its grid as square (side = sqrt(tokens))."""
    cls = Idefics3Connector if family == "idefics3" else SmolVLMConnector
    x = _tokens(2, side, side)
    theirs = cls.pixel_shuffle(None, x, scale)
    assert torch.equal(space_to_depth(x, (side, side), scale), theirs)


def _ours(cfg: PixelShuffle, theirs: dict[str, torch.Tensor], rename) -> PixelShuffleConnector:
    ours = PixelShuffleConnector("proj", cfg, D, OUT)
    state = {k: theirs[rename(k)] for k in ours.state_dict()}
    assert set(map(rename, ours.state_dict())) == set(theirs), "every key maps, both ways"
    ours.load_state_dict(state)
    return ours.eval()


@pytest.mark.parametrize("grid", [(4, 6), (6, 6)])
def test_internvl_connector_matches_transformers(grid):
    cfg = transformers.InternVLConfig(vision_config=VISION,
                                      text_config=dict(model_type="qwen2", **TEXT), downsample_ratio=0.5)
    torch.manual_seed(0)
    proj = InternVLMultiModalProjector(cfg).eval()
    randomise(proj, seed=5)
    theirs = {"model.multi_modal_projector." + k: v for k, v in proj.state_dict().items()}
    ours = _ours(PixelShuffle(scale=2), theirs, projector_layout("model.").to_checkpoint)
    gh, gw = grid
    x = _tokens(3, gh, gw)
    with torch.no_grad():
        shuffled = transformers.InternVLModel.pixel_shuffle(None, x.view(3, gh, gw, D), scale_factor=0.5)
        ref = proj(shuffled.reshape(3, -1, 4 * D))
        got = ours.project(VisualTokens(x, grid))
    assert got.grid == (gh // 2, gw // 2)
    diff = float((got.x - ref).abs().max())
    assert diff < 1e-6, diff


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(("side", "scale"), [(6, 2), (6, 3), (8, 4)])
def test_idefics3_connector_matches_transformers(family, side, scale):
    if family == "idefics3":
        cfg = transformers.Idefics3Config(vision_config=VISION, text_config=TEXT,
                                          scale_factor=scale)
        cls = Idefics3Connector
    else:
        cfg = transformers.SmolVLMConfig(vision_config=VISION, text_config=TEXT,
                                         scale_factor=scale)
        cls = SmolVLMConnector
    torch.manual_seed(0)
    conn = cls(cfg).eval()
    randomise(conn, seed=6)
    theirs = conn.state_dict()
    assert set(theirs) == {"modality_projection.proj.weight"}  # no bias to drop
    ours = _ours(PixelShuffle(scale=scale, norm=False, layers=1, bias=False), theirs,
                 lambda k: k.replace("linear_1.", "modality_projection.proj."))
    x = _tokens(2, side, side)
    with torch.no_grad():
        ref = conn(x)
        got = ours.project(VisualTokens(x, (side, side)))
    diff = float((got.x - ref).abs().max())
    assert diff < 1e-6, diff


SPEC = """
model m {{
  vision enc = siglip {{ image_size = 48  patch_size = 8  width = {d}  depth = 1  heads = 2  mlp = 24 }}
  connector proj = pixel_shuffle(enc -> llm) {{ {body} }}
  language llm = llama {{ width = {out}  depth = 1  heads = 2  ffn = 80  vocab = 64  max_positions = 64 }}
  fusion prefix(proj -> llm)
}}
"""


@pytest.mark.parametrize(("body", "hf"), [
    ("scale = 2", "internvl"),
    ("scale = 3  norm = false  layers = 1  bias = false", "idefics3"),
    ("scale = 2  layers = 3  hidden = 24  bias = false", None),
])
def test_parameter_counts_match_the_module_and_transformers(tmp_path, body, hf):
    analysis = analyse(tmp_path, SPEC.format(d=D, out=OUT, body=body))
    built = build_model(analysis, device="meta").components["proj"]
    total = analysis.shapes.total("proj")
    assert sum(p.numel() for p in built.parameters()) == total
    if hf == "internvl":
        cfg = transformers.InternVLConfig(vision_config=VISION,
                                          text_config=dict(model_type="qwen2", **TEXT))
        with torch.device("meta"):
            ref = InternVLMultiModalProjector(cfg)
        assert total == sum(p.numel() for p in ref.parameters())
    elif hf == "idefics3":
        cfg = transformers.Idefics3Config(vision_config=VISION, text_config=TEXT,
                                          scale_factor=3)
        with torch.device("meta"):
            ref = Idefics3Connector(cfg)
        assert total == sum(p.numel() for p in ref.parameters())
    else:
        assert all(getattr(built, f"linear_{i}").bias is None for i in (1, 2, 3))


def test_bias_false_changes_the_output():
    x = _tokens(1, 4, 4)
    biased = PixelShuffleConnector("proj", PixelShuffle(scale=2, layers=1, norm=False), D, OUT)
    plain = PixelShuffleConnector("proj", PixelShuffle(scale=2, layers=1, norm=False, bias=False), D, OUT)
    plain.linear_1.weight.data.copy_(biased.linear_1.weight.data)
    torch.nn.init.normal_(biased.linear_1.bias)
    with torch.no_grad():
        a = biased.project(VisualTokens(x, (4, 4))).x
        b = plain.project(VisualTokens(x, (4, 4))).x
    assert torch.allclose(a - biased.linear_1.bias, b, atol=1e-6)
    assert not torch.allclose(a, b)

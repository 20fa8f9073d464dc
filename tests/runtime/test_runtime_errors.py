"""Bad input at run time is a typed, one-line `UserInputError`, never a traceback from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import CASES, analyse, image_tokens, pixels, prompts

from vlmspec.diagnostics import UserInputError
from vlmspec.runtime.model import build_model


@pytest.fixture
def tiny(tmp_path):
    analysis = analyse(tmp_path, CASES["connector-mlp"].text())
    torch.manual_seed(0)
    return analysis, build_model(analysis)


def test_sequence_longer_than_max_positions(tiny):
    _, model = tiny
    with pytest.raises(UserInputError, match="129 tokens exceed the language model's max_positions = 128") as e:
        model(torch.ones(1, 129, dtype=torch.long))
    assert e.value.diagnostics[0].code == "E0514"


def test_attention_mask_must_cover_past_and_new_tokens(tiny):
    _, model = tiny
    ids = torch.ones(1, 5, dtype=torch.long)
    cache = model.new_cache()
    model(ids, cache=cache)
    with pytest.raises(UserInputError, match="attention_mask covers 1 tokens but the cache holds 5") as e:
        model(ids[:, :1], attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)
    assert e.value.diagnostics[0].code == "E0506"


def test_labels_must_match_input_ids(tiny):
    _, model = tiny
    with pytest.raises(UserInputError, match="labels have shape") as e:
        model(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))
    assert e.value.diagnostics[0].code == "E0515"


def test_token_outside_the_vocabulary(tiny):
    _, model = tiny
    with pytest.raises(UserInputError, match="token id 300 is outside the vocabulary of 300") as e:
        model(torch.tensor([[1, 300]]))
    assert e.value.diagnostics[0].code == "E0596"


def test_image_token_id_outside_the_vocabulary(tiny):
    analysis, _ = tiny
    with pytest.raises(UserInputError, match="image_token_id 1000") as e:
        build_model(analysis, image_token_id=1000, device="meta")
    assert e.value.diagnostics[0].code == "E0516"


def test_pixel_values_of_the_wrong_rank(tiny):
    _, model = tiny
    with pytest.raises(UserInputError, match="pixel_values for `enc` must be") as e:
        model.encode_images(torch.randn(3, 32, 32))
    assert e.value.diagnostics[0].code == "E0593"


def test_opt_without_grouped_query_attention(tmp_path):
    text = CASES["lm-opt"].text().replace("embed_dim = 32", "embed_dim = 32  kv_heads = 2")
    with pytest.raises(UserInputError, match="`opt` language model") as e:
        build_model(analyse(tmp_path, text), device="meta")
    assert e.value.diagnostics[0].code == "E0509"


def test_patch_merger_needs_a_grid(tmp_path):
    text = CASES["connector-patch_merger"].text()
    analysis = analyse(tmp_path, text)
    model = build_model(analysis)
    ids, mask = prompts(model.image_token_id, image_tokens(analysis))
    model(ids, attention_mask=mask, pixel_values=pixels(analysis))  # the grid divides: fine
    dyn = text.replace("feature = layer(-2).patches", "feature = layer(-2).patches  resolution = dynamic(min_pixels = 256, max_pixels = 4096)")
    model = build_model(analyse(tmp_path, dyn))
    with pytest.raises(UserInputError, match="a 4x5 patch grid is not divisible by merge = 2") as e:
        model.encode_images(torch.randn(1, 3, 32, 40))
    assert e.value.diagnostics[0].code == "E0595"


def test_errors_render_as_one_line_diagnostics(tiny):
    _, model = tiny
    with pytest.raises(UserInputError) as e:
        model(torch.ones(1, 129, dtype=torch.long))
    assert e.value.diagnostics[0].code == "E0514"
    assert str(e.value).startswith("error[E0514]")


_VIT = "vision enc = vit { image_size = 16  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64 "
_LLM = "language llm = llama { width = 48  depth = 2  heads = 4  ffn = 96  vocab = 512  max_positions = 64 "


@pytest.mark.parametrize(("vision", "llm", "code", "message"), [
    (_VIT + "global_layers = 1 }", _LLM + "}", "E0519", "belong to a tiled encoder"),
    (_VIT + "tiles = 2  global_layers = 2 }", _LLM + "}", "E0519", "leaves no local layer"),
    ("vision enc = eva { image_size = 16  patch_size = 8  width = 32  depth = 2  heads = 2  mlp = 64  "
     "attn_bias = false }", _LLM + "}", "E0519", "needs separate q / k / v projections"),
    (_VIT + "}", _LLM + "embed_extra = 8  tie_embeddings = true }", "E0509", "`embed_extra` rows cannot be combined"),
])
def test_settings_that_cannot_build_are_one_line_errors(tmp_path, vision, llm, code, message):
    text = (f"model m {{\n  {vision}\n  connector proj = linear(enc -> llm)\n  {llm}\n"
            "  fusion prefix(proj -> llm)\n}\n")
    analysis = analyse(tmp_path, text)
    with pytest.raises(UserInputError, match=message) as e:
        build_model(analysis)
    assert e.value.diagnostics[0].code == code
    assert "\n" not in e.value.diagnostics[0].message


def test_aspect_ratio_ids_out_of_range(tmp_path):
    text = ("model m {\n  " + _VIT + "tiles = 2  feature = layer(-1).all }\n  connector proj = linear(enc -> llm)\n  "
            + _LLM + "}\n  fusion cross_attention(proj -> llm) { every = 1 }\n}\n")
    model = build_model(analyse(tmp_path, text))
    with pytest.raises(UserInputError, match=r"aspect_ratio_ids must be in 0..3 for 2 tiles") as e:
        model.encode_images(torch.zeros(1, 2, 3, 16, 16), aspect_ratio_ids=torch.tensor([7]))
    assert e.value.diagnostics[0].code == "E0593"


def test_retrieval_embeddings_read_the_tile_layout(tmp_path):
    """`vlm eval` retrieval embeds a tiled encoder's images with the layout the processor chose: a
    two-tile layout reads the second tile, the default (one tile) masks it."""
    import numpy as np

    from vlmspec.evaluation.embeddings import image_embeddings

    text = ("model m {\n  " + _VIT + "tiles = 2  feature = layer(-1).all }\n  connector proj = linear(enc -> llm)\n  "
            + _LLM + "}\n  fusion cross_attention(proj -> llm) { every = 1 }\n}\n")
    model = build_model(analyse(tmp_path, text)).eval()
    px = torch.randn(1, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one = image_embeddings(model, px)
    assert np.allclose(one, image_embeddings(model, px, {"aspect_ratio_ids": torch.tensor([1])}))
    assert not np.allclose(one, image_embeddings(model, px, {"aspect_ratio_ids": torch.tensor([3])}), atol=1e-4)

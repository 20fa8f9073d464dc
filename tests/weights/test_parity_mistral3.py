"""Mistral 3 (`Mistral3ForConditionalGeneration`: Pixtral ViT, RMSNorm + 2x2 patch merger + 2-layer projector,
Mistral text model): import a tiny one and compare with transformers on non-square images read at their own
size: logits within 1e-4 (fp32), 16 greedy tokens identical, a batch of two images of different sizes, the
pixels as `PixtralImageProcessorPil` makes them (sides rounded to patch x merge) and the ids as
`PixtralProcessor` writes them (`[IMG]` per merged patch; it needs torchvision, so its layout is written out
here), the CLI path import -> build -> generate, and the export back to the same tensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import export_round_trip, imported, randomise  # noqa: E402
from test_parity_pixtral import (  # noqa: E402
    IMG,
    N_VOCAB,
    cli_answers_as_transformers,
    non_square_matches,
    reference_ids,
    tokenizer,
    two_sizes_match,
)

transformers = pytest.importorskip("transformers")

PATCH, MERGE, LONGEST = 4, 2, 64
UNIT = PATCH * MERGE


def image_processor(side: int = UNIT):
    """PixtralImageProcessorPil as PixtralProcessor calls it: with patch_size x spatial_merge_size (`side`); the
    folder saves the tower's patch (`side = PATCH`), as Mistral 3's checkpoints do."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": LONGEST}, patch_size={"height": side, "width": side})


def mistral3(out: Path, *, seed: int = 0, bias: bool = False, tie: bool = False):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=LONGEST, patch_size=PATCH, hidden_act="silu",
                           rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}),
        text_config=dict(model_type="mistral", vocab_size=N_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512, sliding_window=None, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        image_token_index=IMG, vision_feature_layer=-1, spatial_merge_size=MERGE, projector_hidden_act="gelu",
        multimodal_projector_bias=bias, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wider than the 0.02 init: logits that vary with the image, answers that vary
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    tokenizer(out)
    image_processor(PATCH).save_pretrained(str(out))
    ip = image_processor()
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": PATCH, "spatial_merge_size": MERGE}))
    return m, ip


def processor(tmp_path, mapping):
    from vlmspec.compiler.compile import load_analysis
    from vlmspec.runtime.inputs.processor import Processor

    analysis, _ = load_analysis(f"{tmp_path / 'model.vlm'}:{mapping['model']}")
    return Processor(analysis, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_mistral3_parity_on_a_non_square_image(tmp_path, bias):

    hf, ip = mistral3(tmp_path / "hf", bias=bias)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), report
    assert set(mapping["components"]) == {"vit", "proj", "llm"}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert "pixtral_merger(vit -> llm)" in mapping["spec"] and "merge = 2" in mapping["spec"]
    non_square_matches(tmp_path, hf, ip, ours, mapping, UNIT)


def test_mistral3_batch_of_two_sizes(tmp_path):
    """Two images of different sizes in one batch (transformers: one sequence, a block-diagonal mask, then each
    image's grid merged on its own): each left-padded row's logits match, and so do 16 greedy tokens."""
    hf, ip = mistral3(tmp_path / "hf", seed=2)
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    two_sizes_match(tmp_path, hf, ip, ours, mapping, UNIT)


def test_mistral3_cli_import_build_generate(tmp_path):
    """`vlm import-hf` -> `vlm build` -> `vlm generate` answers as transformers does on the same image."""
    hf, ip = mistral3(tmp_path / "hf", seed=1)
    cli_answers_as_transformers(tmp_path, hf, ip, UNIT, checks=("check", "fmt --check"))


def test_mistral3_export_round_trip(tmp_path):
    """import -> build -> export-hf gives the checkpoint's tensors back under the same keys, and
    transformers loads the export to the same logits."""
    hf, _ = mistral3(tmp_path / "hf", bias=True)
    _, back = export_round_trip(tmp_path / "hf", tmp_path)
    again = transformers.Mistral3ForConditionalGeneration.from_pretrained(str(back)).eval()
    ids = torch.tensor([reference_ids(2, 3)])
    px = torch.randn(1, 3, 2 * UNIT, 3 * UNIT, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor([[2 * UNIT, 3 * UNIT]])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, pixel_values=px, image_sizes=sizes).logits,
                           again(input_ids=ids, pixel_values=px, image_sizes=sizes).logits)

"""Qwen2.5-VL through `import_hf` + `build_with_weights` against `Qwen2_5_VLForConditionalGeneration`: logits
within 1e-4 (fp32) and 16 greedy tokens identical on non-square images and a two-image prompt, with window
attention active (windows of 4 x 4 patches, smaller than every grid here and cut at its edge, and one
full-attention layer between two windowed ones), RMSNorm, the SwiGLU MLP and the RMSNorm merger; and the
CLI path (`vlm import-hf` -> `vlm build` -> `vlm generate`) answering as transformers does on the same folder.

Hugging Face takes the images as its processor lays them out (flattened patches ordered by 2x2 merge windows,
each repeated over `temporal_patch_size` frames, with `image_grid_thw`); `hf_pixels` builds that from the
same [n x c x h x w] tensor our runtime reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, imported, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

IMG, START, END = 100, 102, 103
PATCH, MERGE, TEMPORAL = 8, 2, 2
WINDOW = 32  # pixels: 2 x 2 merged tokens, 4 x 4 patches a side
SIDE = 64  # the processor's one size (min_pixels = max_pixels): 8 x 8 patches, 2 x 2 windows


def qwen2_5_vl(out: Path, *, kv_heads: int = 2, tie: bool = False, seed: int = 0, pre: bool = True):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3,
                           out_hidden_size=64, patch_size=PATCH, spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL, window_size=WINDOW, fullatt_block_indexes=[1]),
        image_token_id=IMG, video_token_id=101, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # the vision qkv drawn from N(0, 1): sharp attention, so that where a patch may look (its window) shows
    randomise(m, fresh=("attn.qkv",), seed=seed)
    m.save_pretrained(str(out))
    if pre:
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE,
            "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL}))
    return m


def hf_pixels(px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n x c x h x w] -> (pixel_values [(n * gh * gw) x (c * T * P * P)], image_grid_thw [n x 3]), as the
    processor's `patchify` lays them out."""
    n, c, h, w = px.shape
    gh, gw = h // PATCH, w // PATCH
    x = px.reshape(n, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, TEMPORAL, -1, -1)
    return x.reshape(n * gh * gw, c * TEMPORAL * PATCH * PATCH), torch.tensor([[1, gh, gw]] * n)


def prompts(images: int, pad: int, tokens: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `bos, (<vision_start> image tokens <vision_end>) x images, text`, row i left-padded by pad * i."""
    g = torch.Generator().manual_seed(4)
    out = []
    for i in range(rows):
        p = pad * i
        parts = [torch.zeros(p, dtype=torch.long), torch.tensor([1])]
        for _ in range(images):
            parts += [torch.tensor([START]), torch.full((tokens,), IMG), torch.tensor([END])]
        out.append(torch.cat([*parts, torch.randint(3, 99, (8 - p,), generator=g)]))
    mask = (torch.arange(out[0].shape[0])[None] >= torch.tensor([[pad * i] for i in range(rows)])).long()
    return torch.stack(out), mask


def check_parity(hf, ours, images: int, pad: int, size: tuple[int, int]) -> float:
    ids, mask = prompts(images, pad, (size[0] // (PATCH * MERGE)) * (size[1] // (PATCH * MERGE)))
    px = torch.randn(2, images, 3, *size, generator=torch.Generator().manual_seed(2))
    pixel_values, grid = hf_pixels(px.flatten(0, 1))
    kw = dict(pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int())
    mine = px if images > 1 else px[:, 0]
    real = mask.bool()
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask,
                                   **{**kw, "pixel_values": hf_pixels(p.flatten(0, 1))[0]}).logits, px, real=real)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kw).logits
        out = ours(ids, attention_mask=mask, pixel_values=mine).logits
        diff = float((ref[real] - out[real]).abs().max())
        assert diff <= 1e-4
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMG])
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=mine, max_new_tokens=16),
                       want[:, ids.shape[1]:])
    return diff


#: (model options, images per prompt, left padding, image size): 6 x 10 and 10 x 4 patch grids, so the
#: 4 x 4-patch windows are cut at the bottom and right edges
VARIANTS = {"gqa-one_image-48x80-left_pad": (dict(kv_heads=2), 1, 3, (48, 80)),
            "mha-tied-one_image-80x32": (dict(kv_heads=4, tie=True), 1, 0, (80, 32)),
            "gqa-two_images-48x80-left_pad": (dict(kv_heads=2), 2, 2, (48, 80))}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen2_5_vl_parity(tmp_path, variant):
    kw, images, pad, size = VARIANTS[variant]
    hf = qwen2_5_vl(tmp_path / "hf", **kw)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), str(report)
    assert mapping["image_token_id"] == IMG
    spec = mapping["spec"]
    assert "window = 32" in spec and "full_layers = [1]" in spec and 'norm = "rms"' in spec
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    check_parity(hf, ours, images, pad, size)


@pytest.mark.parametrize("size", [(SIDE, SIDE), (48, 80), (112, 16)])
def test_qwen2_5_vl_vision_tokens_match(tmp_path, size):
    """The merger's output alone (windows whole, cut at the edge, and one window wide): our raster-ordered
    patches vs Hugging Face's window-ordered ones, restored after its merger."""
    hf = qwen2_5_vl(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    px = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(7))
    pixel_values, grid = hf_pixels(px)
    with torch.no_grad():
        ref = hf.model.visual(pixel_values, grid_thw=grid).pooler_output
        out = ours.extract_features(px)
    assert (ref.reshape(out.shape) - out).abs().max() <= 1e-5


def test_qwen2_5_vl_windows_matter(tmp_path):
    """Without its windows (every layer global) the tower gives other tokens, by far more than the 1e-5
    the test above allows: it sees whether the windows are right. A spec that drops them from the
    checkpoint's tower is refused (E0587: the shapes fit, the computation does not); loaded anyway
    (strict=False), it shows how far off it would be."""
    from hf_tiny import built

    from vlmspec.compiler.compile import load_analysis
    from vlmspec.diagnostics import UserInputError
    from vlmspec.runtime.weights import build_with_weights

    hf = qwen2_5_vl(tmp_path / "hf")
    _, _, mapping = imported(tmp_path / "hf", tmp_path)
    ours = built(mapping["spec"], mapping, tmp_path, "a.vlm")
    text = mapping["spec"].replace("    window = 32\n", "").replace("    full_layers = [1]\n", "")
    with pytest.raises(UserInputError) as e:
        built(text, mapping, tmp_path, "b.vlm")
    assert e.value.diagnostics[0].code == "E0587" and "`vit.window = 0`" in e.value.diagnostics[0].message
    analysis, _ = load_analysis(f"{tmp_path / 'b.vlm'}:{mapping['model']}")
    glob, report = build_with_weights(analysis, image_token_id=mapping["image_token_id"], strict=False)
    assert report.disagreements
    px = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (ours.extract_features(px) - glob.extract_features(px)).abs().max() > 1e-2
    del hf


# ---------------------------------------------------------------- the CLI path on a whole folder

def test_qwen2_5_vl_folder_generates_as_transformers(tmp_path: Path) -> None:
    from hf_tiny import noise_image
    from test_import_folder_qwen_idefics_mllama import QUESTION, qwen_cli_matches, qwen_folder, qwen_reference

    hf_dir = tmp_path / "hf"
    hf = qwen2_5_vl(hf_dir, seed=2, pre=False)
    tok, images = qwen_folder(hf_dir, max_pixels=96 * 96)
    wide = noise_image(tmp_path / "wide.png", (120, 50), colour=True)  # -> 48 x 128: 6 x 16 patches, windows cut
    tall = tmp_path / "tall.png"  # -> 96 x 48: 12 x 6 patches; a colour gradient, unlike the noise
    Image.fromarray((np.stack([*np.meshgrid(np.linspace(0, 255, 40), np.linspace(255, 0, 90)), np.full((90, 40), 60.0)],
                              -1)).astype(np.uint8)).save(tall)

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    spec, inputs, batch = qwen_cli_matches(hf_dir, tmp_path, model, tok, images, [wide, tall], hf_pixels)
    # exported back, the folder's processor and chat template give transformers the same inputs
    from hf_tiny import export_round_trip

    (tmp_path / "export").mkdir()
    _, back = export_round_trip(hf_dir, tmp_path / "export")
    again = type(images).from_pretrained(str(back))
    tok_back = transformers.AutoTokenizer.from_pretrained(str(back))
    redo = qwen_reference(again, tok_back, tall, QUESTION, MERGE)
    assert redo["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(redo["pixel_values"], inputs["pixel_values"])
    assert "window = 32" in spec and "dynamic(min_pixels = 1024, max_pixels = 9216)" in spec
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")}
    px = batch["pixel_values"]
    assert_sees_image(lambda p: hf(pixel_values=hf_pixels(p)[0], **kw).logits, px)


# ---------------------------------------------------------------- export back

def test_qwen2_5_vl_export_round_trip(tmp_path: Path) -> None:
    """`vlm import-hf` -> `vlm build` -> `vlm export-hf`: the checkpoint's tensors bit for bit under the keys
    `save_pretrained` writes, and a config transformers builds the same model from (same logits)."""
    from hf_tiny import export_round_trip

    hf = qwen2_5_vl(tmp_path / "hf", tie=True)
    _, back = export_round_trip(tmp_path / "hf", tmp_path)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["vision_config"]["window_size"] == WINDOW
    assert config["vision_config"]["fullatt_block_indexes"] == [1]
    again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(back)).eval()
    ids, mask = prompts(1, 0, (48 // (PATCH * MERGE)) * (80 // (PATCH * MERGE)))
    pixel_values, grid = hf_pixels(torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(5)))
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
              mm_token_type_ids=(ids == IMG).int())
    with torch.no_grad():
        assert torch.equal(hf(**kw).logits, again(**kw).logits)

"""Qwen2-VL through `import_hf` + `build_with_weights` against `Qwen2VLForConditionalGeneration`: logits within
1e-4 (fp32) and 16 greedy tokens identical, at the processor's size and at other (non-square) sizes: the
model reads images at their own resolution and numbers their tokens for M-RoPE on their own grid.

Hugging Face takes the images as the processor lays them out: flattened patches ordered by 2x2 merge windows,
each repeated over `temporal_patch_size` frames, with `image_grid_thw`; `hf_pixels` builds exactly that from the
same [n x c x h x w] tensor our runtime reads (the processor's `patchify`, without resize or normalisation).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, imported, randomise  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402
from vlmspec.runtime.weights import build_with_weights, import_hf  # noqa: E402
from vlmspec.runtime.weights.formats import formats  # noqa: E402

transformers = pytest.importorskip("transformers")

IMG, START, END = 100, 102, 103
PATCH, MERGE, TEMPORAL = 8, 2, 2
SIDE = 48  # 6 x 6 patches -> 3 x 3 tokens per image
TOKENS = (SIDE // (PATCH * MERGE)) ** 2


def qwen2_vl(out: Path, *, kv_heads: int = 2, tie: bool = False, seed: int = 0):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL),
        image_token_id=IMG, video_token_id=101, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    # min_pixels = max_pixels: the processor's one size, which the importer writes as `image_size`
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE,
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL}))
    return m


def hf_pixels(px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n x c x h x w] -> (pixel_values [(n * gh * gw) x (c * T * P * P)], image_grid_thw [n x 3]), as
    `Qwen2VLImageProcessor.patchify` lays them out."""
    n, c, h, w = px.shape
    gh, gw = h // PATCH, w // PATCH
    x = px.reshape(n, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, TEMPORAL, -1, -1)
    return x.reshape(n * gh * gw, c * TEMPORAL * PATCH * PATCH), torch.tensor([[1, gh, gw]] * n)


def prompts(images: int, pad: int, rows: int = 2, seed: int = 4, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `bos, (<vision_start> image tokens <vision_end>) x images, text`, row i left-padded by pad * i."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        p = pad * i
        parts = [torch.zeros(p, dtype=torch.long), torch.tensor([1])]
        for _ in range(images):
            parts += [torch.tensor([START]), torch.full((tokens,), IMG), torch.tensor([END])]
        out.append(torch.cat([*parts, torch.randint(3, 99, (8 - p,), generator=g)]))
    ids = torch.stack(out)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[pad * i] for i in range(rows)])).long()
    return ids, mask


def check_parity(hf, ours, images: int, pad: int, size: tuple[int, int] = (SIDE, SIDE)) -> float:
    ids, mask = prompts(images, pad, tokens=(size[0] // (PATCH * MERGE)) * (size[1] // (PATCH * MERGE)))
    px = torch.randn(2, images, 3, *size, generator=torch.Generator().manual_seed(2))
    pixel_values, grid = hf_pixels(px.flatten(0, 1))
    kw = dict(pixel_values=pixel_values, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int())
    mine = px if images > 1 else px[:, 0]
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, **{**kw, "pixel_values": hf_pixels(p.flatten(0, 1))[0]}).logits,
                      px, real=mask.bool())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kw).logits
        out = ours(ids, attention_mask=mask, pixel_values=mine).logits
        real = mask.bool()
        diff = float((ref[real] - out[real]).abs().max())
        assert diff <= 1e-4
        # our generate never emits the image placeholder; ask Hugging Face for the same
        want = hf.generate(input_ids=ids, attention_mask=mask, **kw, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMG])
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=mine, max_new_tokens=16),
                       want[:, ids.shape[1]:])
    return diff


VARIANTS = {"gqa-one_image-left_pad": (dict(kv_heads=2), 1, 3),
            "mha-tied-one_image": (dict(kv_heads=4, tie=True), 1, 0),
            "gqa-two_images-left_pad": (dict(kv_heads=2), 2, 2)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen2_vl_parity(tmp_path, variant):
    kw, images, pad = VARIANTS[variant]
    hf = qwen2_vl(tmp_path / "hf", **kw)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status in ("loaded", "no tensors") for c in report.components.values()), str(report)
    assert mapping["image_token_id"] == IMG
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    if kw.get("tie"):
        assert ours.components["llm"].lm_head.weight is ours.components["llm"].model.embed_tokens.weight
    check_parity(hf, ours, images, pad)


@pytest.mark.parametrize(("size", "images"), [((32, 64), 1), ((64, 32), 2), ((80, 48), 1)])
def test_qwen2_vl_parity_at_native_resolution(tmp_path, size, images):
    """Images of other sizes than the processor's (non-square, larger or smaller): the spec says
    `resolution = dynamic(...)`, the tower attends over the image's own grid and M-RoPE numbers the
    tokens on the merged grid (2 x 4, 4 x 2, 5 x 3 tokens), as transformers' `get_rope_index` does."""
    hf = qwen2_vl(tmp_path / "hf", seed=3)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and "resolution = dynamic(min_pixels = 2304, max_pixels = 2304)" in mapping["spec"]
    check_parity(hf, ours, images=images, pad=2, size=size)


def test_qwen2_vl_vision_tokens_match(tmp_path):
    """The merger's output alone: our raster-ordered patches vs Hugging Face's merge-window order."""
    hf = qwen2_vl(tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    px = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    pixel_values, grid = hf_pixels(px)
    with torch.no_grad():
        ref = hf.model.visual(pixel_values, grid_thw=grid).pooler_output
        out = ours.extract_features(px)
    assert (ref.reshape(out.shape) - out).abs().max() <= 1e-5


def test_qwen2_vl_new_key_layout(tmp_path):
    """A checkpoint in the in-memory layout (`model.visual.*`, `model.language_model.*`) loads too."""
    from safetensors.torch import save_file

    hf = qwen2_vl(tmp_path / "legacy", tie=True)
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((tmp_path / "legacy" / name).read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.visual.blocks.") for k in state)
    save_file(state, str(folder / "model.safetensors"))
    ours, report, mapping = imported(folder, tmp_path)
    assert report.ok, str(report)
    assert mapping["components"]["vit"]["layout"][0] == ["model.visual.blocks.", "encoder.layers."]
    check_parity(hf, ours, 1, 3)


# config.json of Qwen/Qwen2-VL-2B-Instruct (written by transformers 4.41: text fields at the top level)
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def _spec_of(config: dict, folder: Path) -> str:
    blocks, token = formats()["qwen2_vl"].read(config, str(folder))
    return "model m {\n" + "\n".join(blocks) + f"\n  image_token_id = {token}\n}}\n"


def test_qwen2_vl_2b_config_reads_with_the_published_parameter_count(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    text = _spec_of(QWEN2_VL_2B, tmp_path)
    assert "image_size = 448" in text and "mrope(sections = [16, 24, 24])" in text
    assert "tie_embeddings = true" in text and "rope_theta = 1000000.0" in text
    spec = tmp_path / "m.vlm"
    spec.write_text(text)
    analysis, _ = load_analysis(f"{spec}:m")
    assert analysis.total_params == 2_208_985_600


@pytest.mark.parametrize("change, what", [
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(rope_scaling={"type": "yarn", "mrope_section": [16, 24, 24]}), "rope scaling"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}), "mrope_section"),
])
def test_qwen2_vl_settings_a_spec_cannot_express_are_refused(tmp_path, change, what):
    with pytest.raises(UserInputError) as excinfo:
        _spec_of({**QWEN2_VL_2B, **change}, tmp_path)
    diag = excinfo.value.diagnostics[0]
    assert diag.code == "E0585" and what in diag.message


@pytest.mark.parametrize("pre, side", [
    ({}, 448),                                                   # no preprocessor_config.json: 16 x 16 tokens
    ({"min_pixels": 3136, "max_pixels": 200_000}, 420),          # 448^2 is above max_pixels: largest that fits
    ({"size": {"shortest_edge": 300_000, "longest_edge": 400_000}}, 560),  # below min_pixels: smallest that fits
])
def test_qwen2_vl_fixed_image_size(pre, side):
    from vlmspec.runtime.weights.formats.qwen2_vl import image_side

    assert image_side(pre, 28) == side


def test_qwen2_vl_bf16_runs_close_to_fp32(tmp_path):
    """bf16 weights: the vision rotary is applied in float32 and cast back (as Hugging Face does), so the
    encoder attends in one dtype; the logits stay near the fp32 reference."""
    hf = qwen2_vl(tmp_path / "hf")
    text, mapping = import_hf(tmp_path / "hf")
    (tmp_path / "m.vlm").write_text(text)
    analysis, _ = load_analysis(f"{tmp_path / 'm.vlm'}:{mapping['model']}")
    ours, _ = build_with_weights(analysis, image_token_id=IMG, dtype="bf16")
    ids, mask = prompts(1, 0)
    px = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    pixel_values, grid = hf_pixels(px)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                 mm_token_type_ids=(ids == IMG).int()).logits
        out = ours(ids, attention_mask=mask, pixel_values=px).logits
    assert out.dtype == torch.bfloat16
    assert (ref - out.float()).abs().max() <= 2e-2


def test_qwen2_vl_batch_of_two_native_sizes(tmp_path):
    """Two rows whose images have different native sizes (as a training batch mixes them): the processor pads
    them into one tensor with their sizes, and each row's logits equal transformers' on that row alone (its
    own token count and M-RoPE grid), so one forward trains on both."""
    hf = qwen2_vl(tmp_path / "hf", seed=3)
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    from vlmspec.runtime.inputs.images import NativeImageTransform

    g = torch.Generator().manual_seed(5)
    items = [torch.randn(3, 32, 64, generator=g), torch.randn(3, 80, 48, generator=g)]
    px, sizes = NativeImageTransform(SIDE, [0.5] * 3, [0.5] * 3, "bicubic", PATCH * MERGE, 1, 10**6).stack(items)
    assert px.shape == (2, 3, 80, 64) and sizes.tolist() == [[32, 64], [80, 48]]
    rows = []
    for x in items:
        n = (x.shape[1] // (PATCH * MERGE)) * (x.shape[2] // (PATCH * MERGE))
        rows.append([1, START, *[IMG] * n, END, 7, 9, 11])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=px, image_sizes=sizes).logits
        for i, (row, x) in enumerate(zip(rows, items, strict=True)):
            pixel_values, grid = hf_pixels(x[None])
            one = torch.tensor([row])
            ref = hf(input_ids=one, pixel_values=pixel_values, image_grid_thw=grid,
                     mm_token_type_ids=(one == IMG).int()).logits[0]
            assert float((ref - got[i, width - len(row):]).abs().max()) < 1e-4


def test_qwen2_vl_training_data_is_read_at_native_size(tmp_path):
    """Training batches read each image as generation does, at its processor size (not the encoder's
    nominal square), so a model trains on what it will see."""
    from PIL import Image

    from vlmspec.runtime.inputs.data import Dataset, Sample
    from vlmspec.runtime.inputs.processor import Processor
    from vlmspec.runtime.inputs.tokenizer import byte_tokenizer, ensure_special_tokens
    from vlmspec.runtime.train.stage_data import encode_dataset

    qwen2_vl(tmp_path / "hf")
    text, mapping = import_hf(tmp_path / "hf")
    spec = tmp_path / "m.vlm"
    # a wider size range, and room for the byte-level tokenizer (only the processor is built here)
    spec.write_text(text.replace("min_pixels = 2304", "min_pixels = 256").replace("max_pixels = 2304", "max_pixels = 8192")
                    .replace("vocab = 128", "vocab = 512"))
    analysis, _ = load_analysis(f"{spec}:{mapping['model']}")
    tok = ensure_special_tokens(byte_tokenizer(), analysis)
    proc = Processor(analysis, tok)
    paths = []
    for i, (w, h) in enumerate([(64, 32), (40, 90)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (w, h), (200, 40, 40)).save(paths[-1])
    ds = Dataset([Sample(p, [("what is it?", "red")], f"record {i}") for i, p in enumerate(paths)])
    enc = encode_dataset(ds, proc)
    assert [tuple(x.shape[-2:]) for x in enc.pixels] == [(32, 64), (96, 32)]  # smart_resize: 40 -> 32 (round half even)
    counts = [e.input_ids.count(proc.image_token_id) for e in enc.examples]
    assert counts == [2 * 4, 6 * 2]
    batch = proc.training_batch(enc.examples, *proc.stack(enc.pixels))
    assert batch["image_sizes"].tolist() == [[32, 64], [96, 32]]

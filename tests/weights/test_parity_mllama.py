"""Llama 3.2 Vision: import a tiny `MllamaForConditionalGeneration` and compare with transformers: logits
within 1e-4 (fp32) and 16 greedy tokens identical, over tiled images of several aspect ratios (padding
tiles, padding images in rows with fewer images), one to three images per row, adjacent `<|image|>`
tokens (a group the following text sees together), GQA and left padding.

Transformers is given what the Mllama processor gives it: `pixel_values` [b x images x tiles x c x h x w],
`aspect_ratio_ids`, `aspect_ratio_mask` and `cross_attention_mask` computed by the processor's own
functions from the ids. Ours takes the pixels and the aspect-ratio ids and reads the rest from the
`<|image|>` tokens (`image_attention = latest_group`) and the ids (which tiles are real)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import assert_sees_image, built, cli_round_trip, imported, randomise, refusal  # noqa: E402

from vlmspec.compiler.compile import load_analysis  # noqa: E402
from vlmspec.diagnostics import UserInputError  # noqa: E402
from vlmspec.runtime.decoding import KVCache  # noqa: E402
from vlmspec.runtime.weights import import_hf  # noqa: E402
from vlmspec.runtime.weights.formats import formats  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

VOCAB = 128
IMAGE = VOCAB  # `<|image|>` is the first of the embedding's 8 extra rows, as in the real checkpoints
TILES = 4
#: tiles in use per aspect-ratio id for 4 tiles: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1); id 0 pads
IN_USE = [1, 1, 2, 3, 4, 2, 4, 3, 4]
#: weights' std: at transformers' 0.02 the image moves the logits by ~1e-3, too little to see
INIT = 0.1


def mllama(out: Path, *, kv_heads: int = 2, cross: tuple[int, ...] = (1, 4), depth: int = 6, local: int = 3,
           n_global: int = 1, inter: tuple[int, ...] = (0, 2), seed: int = 0, **over):
    """A tiny Mllama; every gate is randomised (transformers starts the cross-attention gates at 0, which
    would hide the cross-attention) and the norms perturbed."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=local, num_global_layers=n_global,
                  attention_heads=2, image_size=32, patch_size=8, max_num_tiles=TILES,
                  intermediate_layers_indices=list(inter), vision_output_dim=32 * (len(inter) + 1), initializer_range=INIT)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=depth,
                num_attention_heads=4, num_key_value_heads=kv_heads, cross_attention_layers=list(cross),
                max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=INIT)
    text.update(over)
    cfg = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    torch.manual_seed(seed)
    m = transformers.MllamaForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


def batch(rows: list[tuple[list[int], list[int], int]], seed: int = 3):
    """rows: (aspect-ratio id per image, image-token positions (after <bos>; adjacent = a group), left
    padding). Returns ids, attention mask, pixels [b x n x tiles x 3 x 32 x 32] (padding tiles and padding
    images zero, as the processor pads), aspect_ratio_ids [b x n], and transformers' aspect_ratio_mask
    and cross_attention_mask."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _, marks, pad in rows:
        body = torch.randint(3, VOCAB, (12,), generator=g)
        for p in marks:
            body[p] = IMAGE
        seqs.append((pad, torch.cat([torch.tensor([0]), body])))
    width = max(pad + len(s) for pad, s in seqs)
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, s) in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    n = max(len(a) for a, _, _ in rows)
    aspect = torch.zeros(len(rows), n, dtype=torch.long)
    px = torch.zeros(len(rows), n, TILES, 3, 32, 32)
    tiles = []
    for i, (aspects, _, _) in enumerate(rows):
        aspect[i, :len(aspects)] = torch.tensor(aspects)
        tiles.append([IN_USE[a] for a in aspects])
        for j, a in enumerate(aspects):
            px[i, j, :IN_USE[a]] = torch.randn(IN_USE[a], 3, 32, 32, generator=g)
    ar_mask = torch.zeros(len(rows), n, TILES, dtype=torch.long)
    ar_mask[:, :, 0] = 1  # the processor marks a padding image's first tile
    for i, t in enumerate(tiles):
        for j, k in enumerate(t):
            ar_mask[i, j, :k] = 1
    sparse = [get_cross_attention_token_mask(r.tolist(), IMAGE) for r in ids]
    xmask = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(sparse, tiles, TILES, width))
    if xmask.shape[2] < n:
        xmask = torch.cat([xmask, xmask.new_zeros(len(rows), width, n - xmask.shape[2], TILES)], dim=2)
    return ids, mask, px, aspect, ar_mask, xmask


#: rows: images per row with their aspect ratios, where their tokens sit, padding
ROWS = {
    "one_image_each": [([6], [0], 0), ([2], [0], 3)],
    "groups_and_padding_images": [([1, 8, 5], [1, 2, 7], 0), ([3], [4], 2), ([7, 4], [3, 4], 1)],
}
VARIANTS = {
    "gqa": dict(seed=0),
    "mha_three_cross_layers": dict(kv_heads=4, cross=(2, 4, 7), depth=9, seed=1),
    "two_global_layers_three_intermediates": dict(local=4, n_global=2, inter=(0, 1, 3), seed=2),
    # the released checkpoints' RoPE scaling, with a short original context so it changes the frequencies
    "llama3_rope": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64), seed=4),
}


def _reference(hf, ids, mask, px, aspect, ar_mask, xmask):
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect,
                    aspect_ratio_mask=ar_mask, cross_attention_mask=xmask).logits
        tokens = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect,
                             aspect_ratio_mask=ar_mask, cross_attention_mask=xmask, max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, pad_token_id=2, eos_token_id=None)
    return logits, tokens[:, ids.shape[1]:]


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mllama_parity(tmp_path, variant, rows):
    hf = mllama(tmp_path / "hf", **VARIANTS[variant])
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok and all(c.status == "loaded" for c in report.components.values()), report.summary()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert mapping["image_token_id"] == IMAGE
    ids, mask, px, aspect, ar_mask, xmask = batch(ROWS[rows])
    real = mask.bool()
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, aspect_ratio_ids=aspect,
                                   aspect_ratio_mask=ar_mask, cross_attention_mask=xmask).logits, px, real=real)
    ref, want = _reference(hf, ids, mask, px, aspect, ar_mask, xmask)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect).logits
        assert (ref[real] - out[real]).abs().max() <= 1e-4
        prefill = ours(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect, cache=KVCache()).logits
        assert (ref[real] - prefill[real]).abs().max() <= 1e-4
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect, max_new_tokens=16)
    assert torch.equal(got, want)
    plain = ours.generate(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect, max_new_tokens=16,
                          use_cache=False)
    assert torch.equal(plain, want)


def test_mllama_semantics_are_exercised(tmp_path):
    """The masks matter on these inputs: attending to every image (`all`), ignoring the groups
    (`latest`), zeroing a token before its first image (`skip_block`, Meta's reference) each differ from
    transformers; and the aspect-ratio id changes what the encoder makes of the same pixels."""
    hf = mllama(tmp_path / "hf")
    ours, _, mapping = imported(tmp_path / "hf", tmp_path)
    ids, mask, px, aspect, ar_mask, xmask = batch(ROWS["groups_and_padding_images"])
    real = mask.bool()
    ref, _ = _reference(hf, ids, mask, px, aspect, ar_mask, xmask)
    for old, new in [('image_attention = "latest_group"', 'image_attention = "all"'),
                     ('image_attention = "latest_group"', 'image_attention = "latest"'),
                     ('no_image = "attend_all"', 'no_image = "skip_block"')]:
        other = built(mapping["spec"].replace(old, new), mapping, tmp_path, "variant.vlm")
        with torch.no_grad():
            out = other(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect).logits
        assert (ref[real] - out[real]).abs().max() > 1e-3, new
    with torch.no_grad():
        tiled = ours.components["vit"](px[:1, 0], aspect[:1, 0]).x
        # the same pixels read as if all four tiles were real: the encoder attends differently
        full = ours.components["vit"](px[:1, 0], torch.tensor([8])).x
    assert (tiled - full).abs().max() > 1e-3


def test_mllama_text_only(tmp_path):
    """No image: transformers skips the cross-attention layers entirely, and so do we."""
    hf = mllama(tmp_path / "hf", seed=1)
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, VOCAB, (2, 9), generator=g)], 1)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ref - ours(ids).logits).abs().max() <= 1e-4
        want = hf.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=2,
                           eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, max_new_tokens=16), want)


def test_mllama_beam_search_keeps_each_beams_mask(tmp_path):
    """Beam search reorders the cache's visual mask with the keys / values: cached and recomputed agree."""
    mllama(tmp_path / "hf", seed=2)
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    ids, mask, px, aspect, _, _ = batch(ROWS["groups_and_padding_images"])
    kw = dict(attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect, max_new_tokens=8, num_beams=3)
    assert torch.equal(ours.generate(ids, **kw), ours.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize(("over", "message"), [
    (dict(cross_attention_layers=[2, 3]), "adjacent cross-attention layers"),
    (dict(cross_attention_layers=[1, 5]), "after the last self-attention layer"),
    (dict(hidden_act="gelu"), "text activation gelu"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "rope scaling"),
    (dict(norm_eps=1e-6), "vision norm_eps = 1e-06"),  # the outer LayerNorms would keep 1e-5: inexact
])
def test_mllama_refuses_what_a_spec_cannot_say(tmp_path, over, message):
    folder = tmp_path / "hf"
    cfg = transformers.MllamaConfig(text_config=dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                                     num_hidden_layers=6, cross_attention_layers=[1, 4]),
                                    vision_config=dict(hidden_size=32, attention_heads=2, num_hidden_layers=3,
                                                       intermediate_layers_indices=[0, 2], vision_output_dim=96))
    data = cfg.to_dict()
    part = "vision_config" if "norm_eps" in over else "text_config"
    data[part].update(over)
    diag = refusal(folder, data)
    assert diag.code == "E0585" and message in diag.message


def test_mllama_cli_round_trip(tmp_path):
    """`vlm import-hf` -> `vlm check` / `vlm fmt --check` -> `vlm build` -> the same logits."""
    hf = mllama(tmp_path / "hf", seed=3)
    model = cli_round_trip(tmp_path / "hf", tmp_path)
    assert model.image_token_id == IMAGE
    ids, mask, px, aspect, ar_mask, xmask = batch(ROWS["one_image_each"])
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, aspect_ratio_ids=aspect,
                                   aspect_ratio_mask=ar_mask, cross_attention_mask=xmask).logits, px, real=mask.bool())
    ref, _ = _reference(hf, ids, mask, px, aspect, ar_mask, xmask)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, pixel_values=px, aspect_ratio_ids=aspect).logits
    assert (ref[mask.bool()] - out[mask.bool()]).abs().max() <= 1e-4


def test_llama_3_2_11b_vision_config_reads_with_the_published_parameter_count(tmp_path):
    """The released checkpoint's config (MllamaConfig's defaults plus its llama3 RoPE scaling) imports into
    a spec whose summary is the class's 10,670,220,835 parameters, without reading any weight."""
    folder = tmp_path / "hf"
    data = transformers.MllamaConfig().to_dict()
    data["vision_config"]["image_size"] = 560  # the released checkpoints' tile (the class default is 448)
    data["text_config"]["rope_parameters"] = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192)
    blocks, token = formats()["mllama"].read(data, str(folder))  # the spec text import_hf writes, no weights read
    text = "model m {\n" + "\n".join(blocks) + f"\n  image_token_id = {token}\n}}\n"
    assert "rope = llama3(factor = 8.0" in text and "layers = [3, 7, 11, 15, 19, 23, 27, 31]" in text
    assert "feature = layers([40, 4, 8, 16, 24, 31]).all" in text and token == 128256
    spec = tmp_path / "m.vlm"
    spec.write_text(text)
    analysis, _ = load_analysis(f"{spec}:m")
    assert analysis.total_params == 10_670_220_835


@pytest.mark.parametrize(("height", "width"), [(20, 20), (32, 32), (40, 90), (90, 40), (300, 100), (100, 300),
                                               (64, 64), (70, 33), (500, 420), (33, 129)])
def test_tiling_matches_the_mllama_image_processor(height, width):
    """vlmspec's processor cuts an image into tiles as transformers' MllamaImageProcessor (PIL) does: the
    same canvas (so the same aspect-ratio id), resize, padding, normalisation and tile order."""
    import numpy as np
    from PIL import Image
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from vlmspec.runtime.inputs.images import TiledImageTransform

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    hf = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=TILES, image_mean=mean,
                                 image_std=std)
    ours = TiledImageTransform(32, mean, std, "bilinear", TILES)
    rng = np.random.default_rng(height * 1000 + width)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ref = hf(images=[[img]], return_tensors="pt")
    got = ours(img)
    assert got.aspect_ratio_id == int(ref["aspect_ratio_ids"][0, 0])
    assert float((got.pixels - ref["pixel_values"][0, 0]).abs().max()) < 1e-5


def test_mllama_processor_settings_are_imported(tmp_path):
    """preprocessor_config.json gives the spec its mean / std and resize filter; a tile size or tile count
    other than the model's is refused."""
    mllama(tmp_path / "hf")
    pre = {"image_processor_type": "MllamaImageProcessor", "size": {"height": 32, "width": 32},
           "max_image_tiles": TILES, "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(pre))
    text, _ = import_hf(tmp_path / "hf")
    assert 'resize = "bilinear"' in text and "mean = [0.5, 0.4, 0.3]" in text and "std = [0.2, 0.3, 0.4]" in text
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({**pre, "size": {"height": 48, "width": 48}}))
    with pytest.raises(UserInputError) as e:
        import_hf(tmp_path / "hf")
    assert e.value.diagnostics[0].code == "E0585" and "tile size 48" in e.value.diagnostics[0].message

"""InstructBLIP: the Q-Former reads the instruction (tokenized with its own BERT tokenizer) beside the
image. Import tiny `InstructBlipForConditionalGeneration`s (OPT and Llama text models) and compare with
transformers, the instruction passed as `Instruction` (its `qformer_input_ids` / `qformer_attention_mask`):
logits within 1e-4 (fp32) and 16 greedy tokens identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, NQ, assert_sees_image, blip_configs, imported, randomise  # noqa: E402

from vlmspec.runtime.connectors import Instruction  # noqa: E402

transformers = pytest.importorskip("transformers")

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, initializer_range=0.1)


def instructblip(out: Path, text: str, seed: int = 0):
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    configs = blip_configs()
    if text == "llama":
        configs["text_config"] = LLAMA
    cfg = transformers.InstructBlipConfig(**configs)
    torch.manual_seed(seed)
    m = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    randomise(m, seed=seed)
    m.save_pretrained(str(out))
    return m


def inputs(bos: int, pad: int, seed: int = 5):
    """Two prompts ([pad] <image> x NQ, bos, text), left-padded by `pad` in the second row, and two
    instructions of different lengths (the shorter right-padded, as the BERT tokenizer pads)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(2):
        p = pad * i
        rows.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.full((NQ,), IMAGE_TOKEN), torch.tensor([bos]),
                               torch.randint(3, 99, (8 - p,), generator=g)]))
    ids = torch.stack(rows)
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[0], [pad]])).long()
    q_ids = torch.randint(3, 120, (2, 7), generator=g)
    q_mask = torch.ones_like(q_ids)
    q_ids[1, 5:], q_mask[1, 5:] = 0, 0
    px = torch.randn(2, 3, 32, 32, generator=g)
    return ids, mask, q_ids, q_mask, px


@pytest.mark.parametrize("text", ["opt", "llama"])
def test_instructblip_parity(tmp_path, text):
    hf = instructblip(tmp_path / "hf", text)
    ours, report, _ = imported(tmp_path / "hf", tmp_path)
    assert report.ok, str(report)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    bos = 2 if text == "opt" else 1
    ids, mask, q_ids, q_mask, px = inputs(bos, pad=2 if text == "llama" else 0)
    instruction = Instruction(q_ids, q_mask)
    real = mask.bool()
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, qformer_input_ids=q_ids,
                                   qformer_attention_mask=q_mask).logits, px, real=real)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, qformer_input_ids=q_ids,
                 qformer_attention_mask=q_mask).logits
        out = ours(ids, attention_mask=mask, pixel_values=px, instruction=instruction).logits
        assert (ref[real] - out[real]).abs().max() <= 1e-4
        plain = ours(ids, attention_mask=mask, pixel_values=px).logits  # without the instruction: different
        assert (ref[real] - plain[real]).abs().max() > 1e-3
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, qformer_input_ids=q_ids,
                           qformer_attention_mask=q_mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None, suppress_tokens=[IMAGE_TOKEN])[:, -16:]
    got = ours.generate(ids, attention_mask=mask, pixel_values=px, instruction=instruction, max_new_tokens=16)
    assert torch.equal(got, want)


def test_instruction_is_per_sample_with_several_images(tmp_path):
    """Two images per prompt: each sample's instruction goes to both of its images."""
    hf = instructblip(tmp_path / "hf", "opt")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    _, _, q_ids, q_mask, _ = inputs(2, pad=0)
    px = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    ids = torch.cat([torch.full((2, 2 * NQ), IMAGE_TOKEN), torch.tensor([[2], [2]]),
                     torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(8))], 1)
    assert_sees_image(lambda p: hf.get_image_features(p.flatten(0, 1), qformer_input_ids=q_ids.repeat_interleave(2, 0),
                      qformer_attention_mask=q_mask.repeat_interleave(2, 0)).pooler_output, px)
    with torch.no_grad():
        ref = hf.get_image_features(px.flatten(0, 1), qformer_input_ids=q_ids.repeat_interleave(2, 0),
                                    qformer_attention_mask=q_mask.repeat_interleave(2, 0)).pooler_output
        feats = ours.encode_images(px, Instruction(q_ids, q_mask))
        out = ours(ids, pixel_values=px, instruction=Instruction(q_ids, q_mask)).logits
        again = ours(ids, image_features=feats).logits
    assert (next(iter(feats.values())) - ref.reshape(2, 2 * NQ, -1)).abs().max() <= 1e-5
    assert torch.equal(out, again)

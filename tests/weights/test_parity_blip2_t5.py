"""BLIP-2 with a T5 / Flan-T5 language model (`Blip2ForConditionalGeneration` whose text config is T5): the
Q-Former's projected queries go in front of the prompt into T5's encoder, the decoder answers. Imported from
a tiny folder (gated-GELU untied as Flan-T5, ReLU tied as T5 v1.0, every parameter randomised), the logits of
a padded batch match within 1e-4 fp32, 16 greedy tokens and a 3-beam search on a non-square image match
`generate`, `vlm import-hf -> build -> generate` answers as transformers' processor + `generate`, and
`vlm export-hf` writes the checkpoint back bit for bit, answering through transformers as `vlm generate` does."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import IMAGE_TOKEN, NQ, _quiet, assert_sees_image, blip_configs, imported, noise_image, randomise  # noqa: E402

transformers = pytest.importorskip("transformers")

QUESTION = "What is in the picture?"
NEW = 16


def t5_tokenizer(vocab: int = 128, image: str = "<image>", image_id: int = IMAGE_TOKEN):
    """A T5-like tokenizer of single characters: `<pad>` 0, `</s>` 1, `<unk>` 2, EOS added after the text (no
    BOS), `image` at `image_id`, `vocab` ids in all."""
    from tokenizers import Tokenizer, decoders, models, processors

    specials = ["<pad>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    table = specials + chars
    table += [f"<x{i}>" for i in range(len(table), image_id)] + [image]
    table += [f"<x{i}>" for i in range(len(table), vocab)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [image]})
    assert fast.convert_tokens_to_ids(image) == image_id
    return fast


def t5_text(gated: bool, tie: bool) -> dict:
    return dict(model_type="t5", vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tie,
                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.0)


def blip2_t5(out: Path, *, gated: bool = True, tie: bool = False, seed: int = 0):
    """A tiny BLIP-2 T5, every parameter randomised; untied, the head is a parameter of its own (as Flan-T5's
    checkpoints hold one: transformers ties T5's head unless the checkpoint's differs)."""
    _quiet(transformers)
    configs = blip_configs()
    configs["text_config"] = t5_text(gated, tie)
    cfg = transformers.Blip2Config(**configs)
    torch.manual_seed(seed)
    m = transformers.Blip2ForConditionalGeneration(cfg).eval()
    lm = m.language_model
    if not tie:
        lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
    randomise(m, seed=seed)
    with torch.no_grad():  # T5's init scales weights by d_model ** -0.5: make the logits spread
        lm.shared.weight.mul_(3.0)
        lm.lm_head.weight[0] *= 0.01  # else the pad row wins every step and greedy answers are all pad
        for name, p in lm.decoder.named_parameters():  # else one token wins every step: answers that vary test the cache
            if "Attention" in name or "DenseReluDense" in name:
                p.mul_(3.0)
    m.save_pretrained(str(out))
    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(str(out))
    return m


def prompt_ids(questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's layout (image placeholders, the text, EOS), right-padded as T5's tokenizer pads."""
    tok = t5_tokenizer()
    rows = [[IMAGE_TOKEN] * NQ + tok(q)["input_ids"] for q in questions]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize(("gated", "tie"), [(True, False), (False, True)], ids=["flan-gated-untied", "relu-tied"])
def test_blip2_t5_logits_and_generation(tmp_path: Path, gated: bool, tie: bool) -> None:
    hf = blip2_t5(tmp_path / "hf", gated=gated, tie=tie, seed=2)  # seed 2: answers of varied tokens
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report.summary() if hasattr(report, "summary") else report
    assert "language llm = t5" in mapping["spec"]
    ours.eval()
    ids, mask = prompt_ids(["a cat?", "What colour is the big square?"])
    px = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[5, 9, 12, 1, -100], [7, 7, 30, 44, 1]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
        start = torch.zeros(2, 1, dtype=torch.long)
        dec = torch.cat([start, labels.clamp(min=0)], dim=1)
        ours_labels = torch.cat([torch.full((2, 1), -100), labels], dim=1)
        got = ours(ids, attention_mask=mask, pixel_values=px, decoder_input_ids=dec, labels=ours_labels)
    diff = float((got.logits[:, :-1] - ref.logits).abs().max())
    assert diff < 1e-4, diff
    assert abs(float(got.loss) - float(ref.loss)) < 1e-4
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p, labels=labels).logits, px)

    # generation on a non-square image, through the built model's own transform
    from PIL import Image

    from vlmspec.runtime.inputs.images import ImageTransform

    img = Image.open(noise_image(tmp_path / "wide.png", (52, 30), colour=True))
    vis = next(c for c in ours.components.values() if hasattr(c, "cfg") and hasattr(c.cfg, "image_size"))
    one = ImageTransform.from_encoder(vis.cfg)(img)[None]
    pids, pmask = prompt_ids([QUESTION])
    with torch.no_grad():
        want = hf.generate(pixel_values=one, input_ids=pids, attention_mask=pmask, max_new_tokens=NEW,
                           do_sample=False, min_new_tokens=NEW)
        mine = ours.generate(pids, attention_mask=pmask, pixel_values=one, max_new_tokens=NEW)
        beams_want = hf.generate(pixel_values=one, input_ids=pids, attention_mask=pmask, max_new_tokens=NEW,
                                 num_beams=3, do_sample=False, eos_token_id=1)
        beams = ours.generate(pids, attention_mask=pmask, pixel_values=one, max_new_tokens=NEW, num_beams=3,
                              eos_token_id=1)
    assert len(set(mine[0].tolist())) >= 4  # varied tokens: a cache that lost a step would show
    assert want[0, 1:].tolist() == mine[0].tolist()  # HF's output starts with the decoder's start token
    with torch.no_grad():  # recomputing the answer each step gives what the cache gives; sampling is seeded
        assert torch.equal(ours.generate(pids, attention_mask=pmask, pixel_values=one, max_new_tokens=NEW,
                                         use_cache=False), mine)
        drawn = [ours.generate(pids, attention_mask=pmask, pixel_values=one, max_new_tokens=NEW, do_sample=True,
                               temperature=1.5, top_p=0.9, seed=7) for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1]) and drawn[0].shape == (1, NEW)
    # a batch of prompts of two lengths: transformers' right-padded, ours left-padded as `generation_batch` pads
    bids, bmask = prompt_ids([QUESTION, "Is it red?"])
    left_ids, left_mask = torch.zeros_like(bids), torch.zeros_like(bmask)
    for i in range(2):
        n = int(bmask[i].sum())
        left_ids[i, bids.shape[1] - n:], left_mask[i, bids.shape[1] - n:] = bids[i, :n], 1
    two = torch.cat([one, one.flip(-1)])
    with torch.no_grad():
        batch_want = hf.generate(pixel_values=two, input_ids=bids, attention_mask=bmask, max_new_tokens=NEW,
                                 do_sample=False, min_new_tokens=NEW)
        batch_mine = ours.generate(left_ids, attention_mask=left_mask, pixel_values=two, max_new_tokens=NEW)
    assert batch_want[:, 1:].tolist() == batch_mine.tolist()
    n = beams.shape[1]
    assert beams_want[0, 1: 1 + n].tolist() == beams[0].tolist()


def test_blip2_t5_folder_generates_as_transformers(tmp_path: Path) -> None:
    """`vlm import-hf -> build -> generate` on a folder with its processor answers as transformers' processor
    + greedy `generate` on the same folder, and the answer depends on the image."""
    from PIL import Image
    from test_import_folder import cli_generate

    hf_dir = tmp_path / "hf"
    hf = blip2_t5(hf_dir, gated=False, tie=True, seed=2)
    pixels = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    transformers.Blip2Processor(image_processor=pixels, tokenizer=t5_tokenizer(), num_query_tokens=NQ) \
        .save_pretrained(str(hf_dir))
    paths = [noise_image(tmp_path / "wide.png", (52, 30), colour=True),
             noise_image(tmp_path / "tall.png", (21, 47), colour=True)]
    ours, spec = cli_generate(hf_dir, tmp_path, paths[0], QUESTION, NEW)
    assert 'prompt = "{image}{q}</s>"' in spec and "language llm = t5" in spec
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    answers, first = [], None
    for path in paths:
        inputs = processor(images=Image.open(path).convert("RGB"), text=QUESTION, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        answers.append(processor.decode(out[0], skip_special_tokens=True).strip())
        first = first or inputs
    assert ours == answers[0] and answers[0] != answers[1], (ours, answers)
    assert_sees_image(lambda p: hf(input_ids=first["input_ids"], attention_mask=first["attention_mask"],
                                   pixel_values=p, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits,
                      first["pixel_values"])


@pytest.mark.parametrize(("gated", "tie"), [(True, False), (False, True)], ids=["flan-gated-untied", "relu-tied"])
def test_blip2_t5_export_round_trips_and_answers(tmp_path: Path, gated: bool, tie: bool) -> None:
    """`vlm import-hf -> build -> export-hf` gives the checkpoint's tensors back bit for bit (the shared
    embedding once, an untied head of its own), and the export answers through transformers' processor +
    `generate` as `vlm generate` answers on the built folder; its chat template lays a conversation out as
    vlmspec's processor does."""
    from hf_tiny import export_round_trip, loaded
    from PIL import Image
    from test_import_folder import runner

    from vlmspec.cli import app

    hf_dir = tmp_path / "hf"
    blip2_t5(hf_dir, gated=gated, tie=tie, seed=2)
    pixels = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    transformers.Blip2Processor(image_processor=pixels, tokenizer=t5_tokenizer(), num_query_tokens=NQ) \
        .save_pretrained(str(hf_dir))
    built, back = export_round_trip(hf_dir, tmp_path)
    image = noise_image(tmp_path / "wide.png", (52, 30), colour=True)
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0 and r.stdout.strip(), r.output
    processor = transformers.AutoProcessor.from_pretrained(str(back))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    inputs = processor(images=Image.open(image).convert("RGB"), text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert processor.decode(out[0], skip_special_tokens=True).strip() == r.stdout.strip()
    _, ours = loaded(built)
    assert inputs["input_ids"][0].tolist() == ours.encode_prompt(QUESTION)
    first = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": QUESTION}]}]
    later = [*first, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]
    for conversation, want in ((first, ours.encode_prompt(QUESTION)),
                               (later, ours.encode_chat([(QUESTION, "A cat.")], "And the colour?"))):
        text = processor.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        got = processor(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt")["input_ids"]
        assert got[0].tolist() == want, text


@pytest.mark.parametrize(("text", "message"), [
    ({"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj `gated-gelu-x`"),
    ({"feed_forward_proj": "swish"}, "T5 activation swish"),
])
def test_a_t5_setting_a_spec_cannot_hold_is_refused(tmp_path: Path, text: dict, message: str) -> None:
    from hf_tiny import refusal

    config = {"model_type": "blip-2", "use_decoder_only_language_model": False, "num_query_tokens": NQ,
              **{k: v for k, v in blip_configs().items() if k.endswith("_config")},
              "text_config": {**t5_text(True, False), **text}}
    d = refusal(tmp_path / "bad", config)
    assert d.code == "E0585" and message in d.message, d.message

"""`vlm import-hf` reads the whole folder: weights, tokenizer, chat template, image processor and generation
config, so that `import-hf -> build -> generate` answers exactly as transformers' processor + chat template +
greedy `generate` do on the same folder, for an image of another size and aspect ratio than the model's."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import IMAGE_TOKEN, assert_sees_image, llava, loaded, noise_image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlmspec.cli import app  # noqa: E402

runner = CliRunner()

#: llava-hf/llava-1.5-7b-hf's chat template
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QUESTION = "What is in the picture?"


def char_tokenizer(vocab: int = 128, image: str = "<image>", image_id: int = IMAGE_TOKEN):
    """A Llama-like tokenizer (BOS added in front) of single characters, `image` at `image_id`, `vocab` ids
    in all (ids past the characters decode as `<xN>`), so every string the model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    table = specials + chars
    table += [f"<x{i}>" for i in range(len(table), image_id)] + [image]
    table += [f"<x{i}>" for i in range(len(table), vocab)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [image]})
    assert fast.convert_tokens_to_ids(image) == image_id
    return fast


def cli_generate_each(hf_dir: Path, tmp: Path, images: list[Path], question: str, new: int) -> tuple[str, str]:
    """`vlm import-hf` -> `vlm build` -> `vlm generate` with one `--image` each (batched): (what it prints,
    the imported spec's text)."""
    spec = tmp / "imported.vlm"
    r = runner.invoke(app, ["import-hf", str(hf_dir), "-o", str(spec)])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0
    r = runner.invoke(app, ["build", str(spec), "-o", str(tmp / "built")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp / "built"), *[a for i in images for a in ("--image", str(i))],
                            "--prompt", question, "--max-new-tokens", str(new)])
    assert r.exit_code == 0, r.output
    return r.stdout.rstrip("\n"), spec.read_text()


def cli_generate(hf_dir: Path, tmp: Path, image: Path, question: str, new: int) -> tuple[str, str]:
    """`vlm import-hf` -> `vlm build` -> `vlm generate`: (the answer, the imported spec's text)."""
    return cli_generate_each(hf_dir, tmp, [image], question, new)


def hf_generate(processor, model, image: Path, question: str, new: int) -> tuple[str, dict]:
    """transformers' processor + chat template + greedy `generate`: (the answer, the inputs)."""
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
    new_ids = out[0, inputs["input_ids"].shape[1]:]
    assert IMAGE_TOKEN not in new_ids.tolist()  # vlmspec never emits the image placeholder; transformers may
    return processor.decode(new_ids, skip_special_tokens=True).strip(), inputs


def test_llava_folder_generates_as_transformers(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf = llava(transformers, hf_dir, seed=3)
    tok = char_tokenizer()
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                resample=3)
    proc = transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=LLAVA_TEMPLATE)
    proc.save_pretrained(str(hf_dir))
    stop = tok.convert_tokens_to_ids("e")  # a second end-of-sequence id, as Llama 3's generation configs have
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    (hf_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, stop]}))
    image = tmp_path / "wide.png"
    noise_image(image, (52, 30))  # not square, not the model's 32 x 32

    ours, spec = cli_generate(hf_dir, tmp_path, image, QUESTION, 12)
    assert "chat_template = " in spec and "kept as it is" in spec and 'fit = "crop"' in spec
    assert 'stop = ["e"]' in spec
    processor = transformers.AutoProcessor.from_pretrained(str(hf_dir))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    want, inputs = hf_generate(processor, model, image, QUESTION, 12)
    assert ours == want

    # the same ids and pixels as transformers' processor, and a reference that reads the image
    _, ours_proc = loaded(tmp_path / "built")
    assert ours_proc.encode_prompt(QUESTION) == inputs["input_ids"][0].tolist()
    assert (ours_proc.transform(image)[None] - inputs["pixel_values"]).abs().max() <= 1e-5
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert_sees_image(lambda p: hf(input_ids=ids, attention_mask=mask, pixel_values=p).logits, inputs["pixel_values"])

    # training data through the kept template: the rendered conversation, loss on each answer (+ eos)
    turns = [(QUESTION, "A cat."), ("And?", "Nothing.")]
    enc = ours_proc.encode_turns(turns)
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
             {"role": "user", "content": [{"type": "text", "text": "And?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]}]
    full = processor.apply_chat_template(convo).replace("<image>", "<image>" * 16)
    assert [i for i in enc.input_ids if i != tok.eos_token_id] == tok(full)["input_ids"]
    assert tok.decode([i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label != -100]) == \
        " A cat. </s> Nothing. </s>"


def test_a_template_that_prompt_and_answer_express_is_translated() -> None:
    from vlmspec.runtime.weights.hf_folder import translate

    tok = char_tokenizer()
    exact = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
             "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% else %}"
             "ASSISTANT: {{ m['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    # (transformers renders with trim_blocks: the newline after `{% endfor %}` goes)
    assert translate(exact, tok, "<image>") == ("USER: {image}{q}ASSISTANT:", " {a}")
    assert translate(LLAVA_TEMPLATE, tok, "<image>") is None  # '<image>\n' per image; no eos after answers

"""Idefics3 and SmolVLM: tiny `Idefics3ForConditionalGeneration` / `SmolVLMForConditionalGeneration` models made
here (SigLIP-like tower, pixel shuffle + one linear, Llama), every parameter randomised, imported. Our processor's
tiles and prompt equal transformers' processor's; the logits and greedy tokens match for an image cut into tiles,
one read as the global image alone, and a two-image prompt; `vlm import-hf -> build -> generate` answers as
transformers' processor + `generate`; the export gives every tensor back and transformers answers on it alike.
The shipped specs' parameter counts equal the Hugging Face classes' (built on the meta device)."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # test_spec_library's builders of Hugging Face configs
from hf_tiny import (  # noqa: E402
    IMAGE_TOKEN,
    _quiet,
    assert_sees_image,
    imported,
    laid_out_transform,
    noise_image,
    randomise,
)

transformers = pytest.importorskip("transformers")
from transformers import processing_utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MEAN = [0.5, 0.5, 0.5]
QUESTION = "What is in the picture?"
#: the marker text of Idefics3's / SmolVLM's prompts (tiles up to 3 x 3 here)
MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
#: Idefics3's template, with the tokenizer's BOS in place of Llama 3's `<|begin_of_text|>`
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}{% if message['content'][0]"
            "['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}{% for line in message['content'] %}"
            "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}"
            "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
            "{{ 'Assistant:' }}{% endif %}")

#: family -> (tower image size, patch, shuffle scale, longest edge, seed); SmolVLM's tiles, like its 384 px ones
#: with 14 px patches, are not whole patches (the convolution drops the last pixels)
TINY = {"idefics3": (32, 8, 2, 96, 3), "smolvlm": (50, 8, 3, 100, 2)}


@pytest.fixture(autouse=True)
def no_video(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers checks a processor's (absent) video processor against a class it only has with
    torchvision; SmolVLM's processor spells video frame counts with num2words, not installed here."""
    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", object, raising=False)
    from transformers.models.smolvlm import processing_smolvlm

    monkeypatch.setattr(processing_smolvlm, "num2words", str)


class NoVideo:
    """What SmolVLM's processor reads of its video processor (torchvision's, absent here) for an image chat."""

    num_frames, fps = 64, 1


def tokenizer():
    """A lossless Llama-like tokenizer (BOS added in front): single printable characters, `<image>` at
    IMAGE_TOKEN, then the marker tokens, 128 ids in all."""
    from tokenizers import Tokenizer, decoders, models, processors

    table = ["<unk>", "<s>", "</s>", "<pad>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    table += [f"<x{i}>" for i in range(len(table), IMAGE_TOKEN)] + ["<image>"] + MARKERS
    table += [f"<x{i}>" for i in range(len(table), 128)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(table)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *MARKERS]})
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    return fast


def _classes(family: str):
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Ip

        return (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration, Ip,
                transformers.Idefics3Processor, {})
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Ip

    return (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration, Ip,
            transformers.SmolVLMProcessor, {"video_processor": None})


def tiny(family: str, out: Path, splitting: bool = True):
    """The tiny reference, saved with its tokenizer, processor and chat template: (model, processor)."""
    _quiet(transformers)
    size, patch, scale, edge, seed = TINY[family]
    config_cls, model_cls, ip_cls, proc_cls, extra = _classes(family)
    cfg = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=size, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=3),
        image_token_id=IMAGE_TOKEN, scale_factor=scale, pad_token_id=3)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(str(out))
    ip = ip_cls(size={"longest_edge": edge}, max_image_size={"longest_edge": size}, do_image_splitting=splitting,
                image_mean=MEAN, image_std=MEAN)
    per_tile = (size // patch // scale) ** 2
    tok = tokenizer()
    proc = proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=per_tile, chat_template=TEMPLATE, **extra)
    if family == "idefics3":
        proc.save_pretrained(str(out))
    else:  # SmolVLM's processor cannot save itself without its video processor: its parts, as it would
        tok.save_pretrained(str(out))
        ip.save_pretrained(str(out))
        (out / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor",
                                                               "image_seq_len": per_tile}))
        (out / "chat_template.jinja").write_text(TEMPLATE)
    return model, proc



def _rgb(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


#: (family, splitting, (width, height)): wide and tall images cut into tiles, and images read whole
CASES = [("idefics3", True, (90, 40)), ("idefics3", True, (50, 70)), ("idefics3", False, (70, 30)),
         ("smolvlm", True, (40, 90)), ("smolvlm", False, (60, 35))]


@pytest.mark.parametrize(("family", "splitting", "size"), CASES,
                         ids=[f"{f}-{'tiles' if s else 'global'}-{w}x{h}" for f, s, (w, h) in CASES])
def test_parity(tmp_path, family, splitting, size):
    hf, proc = tiny(family, tmp_path / "hf", splitting)
    ours, report, mapping = imported(tmp_path / "hf", tmp_path)
    assert report.ok, report
    assert f"tiles = {str(splitting).lower()}" in mapping["spec"]
    path = noise_image(tmp_path / "img.png", size, colour=True)
    text = f"a<image>{QUESTION}"
    theirs = proc(images=[_rgb(path)], text=[text], return_tensors="pt")
    transform = laid_out_transform(ours)
    item = transform(path)
    ref_px = theirs["pixel_values"][0]
    assert item.pixels.shape == ref_px.shape
    assert float((item.pixels - ref_px).abs().max()) < 1e-5
    tiles = ref_px.shape[0]
    assert (tiles > 1) == splitting
    assert theirs["pixel_attention_mask"].all()  # whole tiles: the bucketed positions are the learned ones
    s = TINY[family][0]
    per_tile = (s // TINY[family][1] // TINY[family][2]) ** 2
    tok = proc.tokenizer
    prompt = "a" + transform.prompt(item, "<image>", per_tile) + QUESTION
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids.tolist() == theirs["input_ids"].tolist()
    px, sizes = transform.stack([item])
    hf_kw = dict(pixel_values=theirs["pixel_values"], pixel_attention_mask=theirs["pixel_attention_mask"])
    with torch.no_grad():
        ref = hf(input_ids=ids, **hf_kw).logits
        got = ours(ids, pixel_values=px, image_sizes=sizes).logits
    assert_sees_image(lambda p: hf(input_ids=ids, pixel_values=p).logits, theirs["pixel_values"])
    diff = float((ref - got).abs().max())
    print(f"{family} {size} splitting={splitting}: {tiles} tiles, max logit diff {diff:.2e}")
    assert diff < 1e-4
    with torch.no_grad():
        theirs_gen = hf.generate(input_ids=ids, **hf_kw, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        ours_gen = ours.generate(ids, pixel_values=px, image_sizes=sizes, max_new_tokens=16)[0]
    print(" greedy", theirs_gen.tolist())
    assert ours_gen.tolist()[: len(theirs_gen)] == theirs_gen.tolist()


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_two_images_in_one_prompt(tmp_path, family):
    """Two images of different tile counts in one prompt: each image's tiles then the zero frames that pad
    them to the larger count, as transformers' processor stacks a sample's images; the logits match."""
    hf, proc = tiny(family, tmp_path / "hf")
    ours, _, _ = imported(tmp_path / "hf", tmp_path)
    transform = laid_out_transform(ours)
    paths = [noise_image(tmp_path / f"{i}.png", size, colour=True) for i, size in enumerate([(90, 40), (80, 90)])]
    items = [transform(p) for p in paths]
    theirs = proc(images=[[_rgb(p) for p in paths]], text=["a<image>b<image>c"], return_tensors="pt")
    px, sizes = transform.stack(items)
    counts = [x.pixels.shape[0] for x in items]
    assert counts[0] != counts[1]
    flat = torch.cat([px[i, :n] for i, n in enumerate(counts)])
    real = theirs["pixel_values"][0][: sum(counts)]
    assert float((flat - real).abs().max()) < 1e-5
    per_tile = (TINY[family][0] // TINY[family][1] // TINY[family][2]) ** 2
    prompt = "a" + transform.prompt(items[0], "<image>", per_tile) + "b" + \
        transform.prompt(items[1], "<image>", per_tile) + "c"
    ids = proc.tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids.tolist() == theirs["input_ids"].tolist()
    hf_kw = dict(pixel_values=theirs["pixel_values"], pixel_attention_mask=theirs["pixel_attention_mask"])
    with torch.no_grad():
        ref = hf(input_ids=ids, **hf_kw).logits
        got = ours(ids, pixel_values=px[None], image_sizes=sizes[None]).logits
    diff = float((ref - got).abs().max())
    print(f"{family} two images ({counts} tiles): max logit diff {diff:.2e}")
    assert diff < 1e-4
    with torch.no_grad():
        theirs_gen = hf.generate(input_ids=ids, **hf_kw, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        ours_gen = ours.generate(ids, pixel_values=px[None], image_sizes=sizes[None], max_new_tokens=16)[0]
    assert ours_gen.tolist()[: len(theirs_gen)] == theirs_gen.tolist()


def _processor(family: str, folder: Path):
    """transformers' processor of a folder: Idefics3's `AutoProcessor`; SmolVLM's from its parts (it cannot
    load without its video processor)."""
    if family == "idefics3":
        return transformers.AutoProcessor.from_pretrained(str(folder))
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    seq = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    return transformers.SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil.from_pretrained(str(folder)),
                                         tokenizer=transformers.AutoTokenizer.from_pretrained(str(folder)),
                                         image_seq_len=seq, chat_template=(folder / "chat_template.jinja").read_text(),
                                         video_processor=NoVideo())


def _model(family: str, folder: Path):
    return _classes(family)[1].from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_folder_generates_as_transformers(tmp_path, family):
    """`vlm import-hf -> build -> generate` on a tall and a wide image answers as transformers' processor,
    chat template and greedy `generate` on the same folder."""
    from test_import_folder import cli_generate_each, hf_generate

    hf_dir = tmp_path / "hf"
    tiny(family, hf_dir)
    images = [noise_image(tmp_path / "wide.png", (90, 40), colour=True),
              noise_image(tmp_path / "tall.png", (50, 70), colour=True)]
    out, spec = cli_generate_each(hf_dir, tmp_path, images, QUESTION, 12)
    assert f"layout = split(longest_edge = {TINY[family][3]}, tiles = true)" in spec
    processor, model = _processor(family, hf_dir), _model(family, hf_dir)
    want = [hf_generate(processor, model, image, QUESTION, 12)[0] for image in images]
    print(family, want)
    assert out == "\n".join(want) and all(want) and want[0] != want[1]  # (an answer may hold a newline)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_round_trips_and_the_export_answers_as_vlm_generate(tmp_path, family):
    """`import-hf -> build -> export-hf` gives every tensor back bit for bit under the same keys; the export's
    config and processor are the family's, and transformers answers on it as `vlm generate` does."""
    from hf_tiny import config_subset, export_round_trip
    from test_import_folder import hf_generate, runner

    from vlmspec.cli import app

    hf_dir = tmp_path / "hf"
    tiny(family, hf_dir)
    built, back = export_round_trip(hf_dir, tmp_path, fmt=None if family == "idefics3" else "smolvlm")
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == family
    theirs = json.loads((hf_dir / "config.json").read_text())
    assert not config_subset({k: config[k] for k in ("scale_factor", "image_token_id")}, theirs)
    assert not config_subset(config["vision_config"], theirs["vision_config"])
    image = noise_image(tmp_path / "wide.png", (90, 40), colour=True)
    r = runner.invoke(app, ["generate", str(built), "--image", str(image), "--prompt", QUESTION,
                            "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    want, _ = hf_generate(_processor(family, back), _model(family, back), image, QUESTION, 12)
    assert r.stdout.strip() == want and want


# ------------------------------------------------------------------ the shipped specs

SPECS = [("idefics3-8b.vlm", "idefics3_8b", "idefics3"), ("smolvlm-2.2b.vlm", "smolvlm_2_2b", "smolvlm")]


def hf_model(ir, family: str):
    """The Hugging Face class and config a spec's IR describes (for the parameter count)."""
    from test_spec_library import _llama_text, _one

    v, proj, lm = _one(ir, "vision"), _one(ir, "connector", "pixel_shuffle"), _one(ir, "language")
    assert v.kind == "siglip" and v.feature_norm and not proj.norm and proj.layers == 1 and not proj.bias
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size)
    config_cls, model_cls = _classes(family)[:2]
    cfg = config_cls(vision_config=vision, text_config=_llama_text(lm), scale_factor=proj.scale,
                     image_token_id=lm.vocab - 1, tie_word_embeddings=lm.tie_embeddings)
    return model_cls, cfg


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize(("file", "model", "family"), SPECS, ids=[s[1] for s in SPECS])
def test_spec_params_match_transformers(file, model, family, tiny):
    """`vlm summary`'s total equals the Hugging Face class built on the meta device from the spec; the full
    model's count is the one its header publishes."""
    from test_spec_library import _meta_count

    from vlmspec.compiler.compile import load_analysis
    from vlmspec.compiler.summary import summarise

    analysis = load_analysis(f"{ROOT / 'specs' / file}:{model}{'_tiny' if tiny else ''}")[0]
    ours = summarise(analysis)["params"]["total"]
    theirs = _meta_count(*hf_model(analysis.ir, family))
    print(file, tiny, f"{theirs:,}")
    assert ours == theirs
    if not tiny:
        assert f"({theirs:,} in the Hugging Face class)" in (ROOT / "specs" / file).read_text()


@pytest.mark.parametrize("spec", ["idefics3-8b.vlm:idefics3_8b_tiny", "smolvlm-2.2b.vlm:smolvlm_2_2b_tiny"],
                         ids=["idefics3_8b_tiny", "smolvlm_2_2b_tiny"])
def test_tiny_spec_trains_its_stages_and_answers(spec, tmp_path):
    """`vlm data synth -> vlm train --steps 2` runs every stage, the images cut into tiles in the batches, and
    the trained folder answers with `vlm generate`; `vlm build` of the untrained spec generates too."""
    from typer.testing import CliRunner

    from vlmspec.cli import app
    from vlmspec.compiler.compile import load_analysis

    runner = CliRunner()
    data = tmp_path / "shapes"
    r = runner.invoke(app, ["data", "synth", "-o", str(data), "--n", "64", "--test", "8", "--size", "48"])
    assert r.exit_code == 0, r.output
    path = f"{ROOT}/specs/{spec}"
    r = runner.invoke(app, ["train", path, "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    for stage in load_analysis(path)[0].ir.stages:
        assert stage.name in r.output
    image = str(next(data.rglob("*.png")))
    r = runner.invoke(app, ["generate", str(tmp_path / "run" / "final"), "--image", image,
                            "--prompt", "What colour is the shape?", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["build", path, "-o", str(tmp_path / "built")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "built"), "--image", image, "--prompt", "Shape?",
                            "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ what the formats refuse

SPEC = """
model m {
  vision siglip = siglip { image_size = 32  patch_size = 8  width = 32  depth = 1  heads = 2  mlp = 64
                           layout = split(longest_edge = 64, tiles = true)  resize = lanczos }
  connector proj = pixel_shuffle(siglip -> llm) { scale = 2  norm = false  layers = 1  bias = false }
  language llm = llama { width = 48  depth = 1  heads = 4  kv_heads = 2  ffn = 96  vocab = 128  max_positions = 512 }
  fusion prefix(proj -> llm)
}
"""


@pytest.mark.parametrize(("edit", "named"), [
    (("norm = false", "norm = true"), "connector `proj` with norm = true"),
    (("resize = lanczos }", "resize = lanczos  feature_norm = false }"), "feature_norm = false"),
    (("tiles = true)", 'tiles = true, around = "<a>")'), "the processor's marker text is fixed"),
    (("fusion prefix(proj -> llm)", "fusion prefix(proj -> llm) { prefix_attention = bidirectional }"),
     "fusion `prefix` with prefix_attention = bidirectional"),
], ids=["norm", "feature_norm", "markers", "bidirectional"])
def test_a_spec_the_format_cannot_hold_is_refused_in_one_line(tmp_path, edit, named):
    from test_export_blip_paligemma import model_dir
    from test_import_folder import runner

    from vlmspec.cli import app

    assert edit[0] in SPEC
    folder = model_dir(tmp_path, SPEC.replace(*edit))
    for fmt in ([], ["--format", "smolvlm"]):
        r = runner.invoke(app, ["export-hf", str(folder), "-o", str(tmp_path / "hf"), *fmt])
        assert r.exit_code != 0 and "Traceback" not in r.output
        lines = [x for x in r.output.splitlines() if "error[E0586]" in x]
        title = "SmolVLM" if fmt else "Idefics3"
        assert len(lines) == 1 and named in lines[0] and f"does not fit the {title} layout" in lines[0], r.output
        assert not (tmp_path / "hf").exists()


def test_a_tile_other_than_the_tower_is_refused(tmp_path):
    """A processor tile (`max_image_size`) other than the tower's size would feed the tower partial grids, whose
    bucketed positions are not its learned ones: E0585, not a silently different model."""
    from hf_tiny import refusal

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_image_size": {"longest_edge": 48},
                                                                 "size": {"longest_edge": 96}}))
    d = refusal(folder, {"model_type": "idefics3", "vision_config": {"image_size": 32, "patch_size": 8},
                         "text_config": {"model_type": "llama"}})
    assert d.code == "E0585" and "max_image_size" in d.message and "48" in d.message

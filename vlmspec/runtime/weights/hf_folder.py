"""What a Hugging Face VLM folder says besides its weights, read for `import_hf`: the chat template, the
image processor (`preprocessor_config.json`) and the generation config (`generation_config.json`).

Each becomes spec text: the chat template the spec's `chat_template` (or `prompt` / `system` where that
lays prompts out exactly alike), the image processor the encoder's `image_size`-checked `fit`, `resize`,
`mean` and `std`, the generation config's end-of-sequence tokens the spec's `stop`. What a spec cannot
express is refused (E0585), never dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmspec.runtime.weights.spec_text import Raw, need

#: PIL resampling codes in preprocessor_config.json -> the spec's `resize`
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        out = {}
    return out if isinstance(out, dict) else {}


# ---------------------------------------------------------------- the image processor


def _side(value: Any, what: str) -> int | None:
    """A processor size: an int, {"height": h, "width": w} (square only), or {"shortest_edge": s}."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        if "shortest_edge" in value and len(value) == 1:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            need(value["height"] == value["width"], f"a non-square processor {what} {value['height']}x{value['width']}")
            return int(value["height"])
    need(False, f"processor {what} {value}")
    return None


def image_processor(folder: str | Path) -> dict[str, Any]:
    """The image processor's settings: `preprocessor_config.json`, else the `image_processor` entry of
    `processor_config.json` (where transformers 5 saves a processor's parts)."""
    pre = read_json(Path(folder) / "preprocessor_config.json")
    if not pre:
        nested = read_json(Path(folder) / "processor_config.json").get("image_processor")
        pre = nested if isinstance(nested, dict) else {}
    return pre


def image_fields(folder: str | Path, image_size: int, *, resize: str = "bicubic",
                 mean: list[float] | None = None, std: list[float] | None = None) -> list[tuple[str, Any]]:
    """The encoder fields `preprocessor_config.json` implies: `fit` (resize-and-centre-crop, pad to a
    square, or a plain resize), `resize` (the filter), `mean` and `std`. The defaults (`resize`, `mean`,
    `std`: the processor class's own) are written when the folder has no such file. Refused: a final size
    other than the model's `image_size`, a rescale factor other than 1/255, a processor that does not
    normalise, and sizes that differ from each other (resize to 256, crop to 224)."""
    pre = image_processor(folder)
    out: list[tuple[str, Any]] = []
    resample = pre.get("resample", None)
    if resample is not None:
        need(resample in RESAMPLE, f"processor resample filter {resample}")
        resize = RESAMPLE[resample]
    out.append(("resize", resize))
    if pre.get("do_rescale", True):
        factor = float(pre.get("rescale_factor", 1 / 255))
        need(abs(factor * 255 - 1) < 1e-6, f"processor rescale_factor {factor} (vlmspec scales by 1/255)")
    else:
        need(False, "a processor that does not rescale (`do_rescale = false`)")
    need(pre.get("do_resize", True), "a processor that does not resize (`do_resize = false`)")
    size = _side(pre.get("size"), "size")
    crop = _side(pre.get("crop_size"), "crop_size") if pre.get("do_center_crop", False) else None
    shortest = isinstance(pre.get("size"), dict) and "shortest_edge" in pre["size"]
    if crop is not None:
        need(size in (None, crop), f"a processor that resizes to {size} and crops to {crop}")
        fit = "crop"
        final = crop
    else:
        need(not shortest, "a processor that resizes the shortest edge without cropping (images of other sizes)")
        fit = "stretch"
        final = size if size is not None else image_size
    if pre.get("do_pad", False) and str(pre.get("image_processor_type", "")).startswith("LlavaImageProcessor"):
        # LlavaImageProcessor's `do_pad`: a square of the mean colour first (its crop is then a no-op); other
        # processors pad a batch to its largest image, a no-op once every image has the model's size
        fit = "pad"
    need(final == image_size, f"a processor image size {final} other than the vision model's {image_size}")
    if fit != "stretch":
        out.append(("fit", fit))
    if not pre.get("do_normalize", True):
        need(False, "a processor that does not normalise (`do_normalize = false`)")
    m, s = pre.get("image_mean", mean), pre.get("image_std", std)
    if isinstance(m, list) and isinstance(s, list):
        out += [("mean", Raw(str([float(x) for x in m]))), ("std", Raw(str([float(x) for x in s])))]
    return out


# ---------------------------------------------------------------- the chat template


def chat_template(folder: str | Path) -> str | None:
    """The folder's chat template: `chat_template.jinja`, `chat_template.json`, else the tokenizer's
    (`tokenizer_config.json`; of several named templates, `default`)."""
    path = Path(folder)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        value = read_json(path / name).get("chat_template")
        if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if isinstance(value, str) and value:
            return value
    return None


# ---------------------------------------------------------------- the generation config


def stop_tokens(folder: str | Path, tokenizer: Any | None) -> list[str]:
    """`generation_config.json`'s `eos_token_id` (one id or several) as token strings, for the spec's
    `stop`; the tokenizer's own end-of-sequence token is left out (generation always stops there)."""
    gen = read_json(Path(folder) / "generation_config.json")
    eos = gen.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    if not ids or tokenizer is None:
        return []
    out = []
    for i in ids:
        if i == tokenizer.eos_token_id:
            continue
        token = tokenizer.convert_ids_to_tokens(i)
        need(isinstance(token, str), f"generation_config.json's eos_token_id {i}, which the tokenizer does not have")
        out.append(token)
    return out


def folder_tokenizer(folder: str | Path) -> Any | None:
    """The folder's tokenizer as saved (None without one)."""
    path = Path(folder)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from vlmspec.runtime.inputs.tokenizer import load_tokenizer

    return load_tokenizer(path, plain=True)


# ---------------------------------------------------------------- the spec's settings


def _render(template: str, tokenizer: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=generation,
                                 **tokenizer.special_tokens_map)[0][0]


def _user(question: str, images: int) -> dict[str, Any]:
    return {"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": question}]}


def _assistant(answer: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def translate(template: str, tokenizer: Any, image_token: str) -> tuple[str, str] | None:
    """(`prompt`, `answer`) that lay every conversation out exactly as the template does, else None.

    Exact means, for several questions and answers: a first question with one image or none, the
    generation prompt after it, an answer ending in the end-of-sequence token, and a second question
    after it, each render equal to what `prompt` / `answer` give (the processor adds BOS itself, so the
    tokenizer must add just BOS or the template must begin with it)."""
    q, a = "\x01q\x01", "\x01a\x01"
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    try:
        one = _render(template, tokenizer, [_user(q, 1)], True)
    except Exception:  # a template that needs more than a plain conversation (tools, a date, ...)
        return None
    starts = bool(bos) and one.startswith(bos)
    if not starts:
        probe = "a"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if with_special != ([tokenizer.bos_token_id] if bos else []) + plain:
            return None

    def strip(text: str) -> str:
        return text[len(bos):] if starts and text.startswith(bos) else text

    prompt = strip(one)
    if prompt.count(image_token) != 1 or prompt.count(q) != 1 or "{" in prompt or "}" in prompt:
        return None
    prompt = prompt.replace(image_token, "{image}").replace(q, "{q}")
    try:
        answered = _render(template, tokenizer, [_user(q, 1), _assistant(a)], False)
    except Exception:
        return None
    tail = answered[len(one):] if answered.startswith(one) else ""
    if not (eos and tail.endswith(eos) and tail.count(a) == 1) or "{" in tail or "}" in tail:
        return None
    answer = tail[: -len(eos)].replace(a, "{a}")

    def ours(question: str, images: int) -> str:
        return prompt.replace("{image}", image_token * images).replace("{q}", question)

    try:
        for question, reply in (("What is in the image?", "A cat."), ("two\nlines", "x y")):
            for images in (0, 1):
                if strip(_render(template, tokenizer, [_user(question, images)], True)) != ours(question, images):
                    return None
            convo = [_user(question, 1), _assistant(reply), _user(question, 0)]
            want = ours(question, 1) + answer.replace("{a}", reply) + eos + ours(question, 0)
            if strip(_render(template, tokenizer, convo, True)) != want:
                return None
    except Exception:
        return None
    return prompt, answer


def _adds_bos(tokenizer: Any) -> bool | None:
    """Whether the tokenizer adds just BOS in front of a text (True), nothing (False), or else (None)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special == plain:
        return False
    return True if with_special == [tokenizer.bos_token_id, *plain] else None


def processor_prompt(folder: str | Path, tokenizer: Any) -> tuple[str, str | None, str] | None:
    """(`prompt`, `answer` or None, note) where the folder's processor, not a chat template, lays the prompt
    out, else None. BLIP-2 / InstructBLIP: the image placeholders (one per query), then the tokenizer's
    encoding of the text (its BOS after the images). PaliGemma: the image placeholders, BOS, the text and a
    newline; the answer (`suffix`) follows it directly, then EOS. The prompt names the BOS token, so the
    processor does not add another in front."""
    config = read_json(Path(folder) / "config.json")
    mt = config.get("model_type")
    if mt not in ("blip-2", "instructblip", "paligemma") or tokenizer is None:
        return None
    bos = tokenizer.bos_token
    proc = read_json(Path(folder) / "processor_config.json")
    if mt == "paligemma":
        need(isinstance(bos, str) and bool(bos), "a PaliGemma tokenizer without a BOS token")
        tokens = image_processor(folder).get("image_seq_length", proc.get("image_seq_length"))
        vc = config.get("vision_config", {})
        grid = (vc.get("image_size", 224) // vc.get("patch_size", 16)) ** 2
        need(tokens in (None, grid), f"a processor image_seq_length {tokens} other than the tower's {grid} patches")
        return ("{image}" + bos + "{q}\n", "{a}", "# Prompt: PaliGemma's processor layout (images, BOS, the "
                "question, a newline; the answer after it, then EOS).")
    queries = proc.get("num_query_tokens")
    need(queries in (None, config.get("num_query_tokens")), f"a processor num_query_tokens {queries} other than "
         f"the model's {config.get('num_query_tokens')}")
    if config.get("text_config", {}).get("model_type") == "t5":  # BLIP-2 Flan-T5: the text ends with EOS
        from vlmspec.runtime.weights.formats.blip2 import t5_prompt

        return t5_prompt(tokenizer)
    adds = _adds_bos(tokenizer)
    need(adds is True and isinstance(bos, str) and bool(bos), "a BLIP-2 / InstructBLIP tokenizer that does not add "
         "just a BOS token in front of the text (the processor puts it after the image placeholders)")
    return ("{image}" + bos + "{q}", None, "# Prompt: the processor's layout (one image placeholder per query, "
            "then the tokenized text with its BOS); the folder has no chat template.")


def format_template(folder: str | Path, template: str | None, tokenizer: Any) -> tuple[str, str] | None:
    """(chat template, note) where the folder's processor lays a rendered conversation out its own way
    (IDEFICS wraps each image in `<fake_token_around_image>`: `formats/idefics.py`), else None."""
    if tokenizer is None or read_json(Path(folder) / "config.json").get("model_type") != "idefics":
        return None
    from vlmspec.runtime.weights.formats.idefics import processor_template

    return processor_template(template)


def settings(folder: str | Path, image_token: str) -> tuple[list[str], list[str]]:
    """(the spec's settings lines, comment lines) from the folder's chat template and generation config."""
    from vlmspec.compiler.schema.base import quote

    tokenizer = folder_tokenizer(folder)
    lines: list[str] = []
    notes: list[str] = []
    template = chat_template(folder)
    fixed = processor_prompt(folder, tokenizer)
    if fixed is not None:
        prompt, answer, note = fixed
        lines.append(f"  prompt = {quote(prompt)}")
        if answer is not None:
            lines.append(f"  answer = {quote(answer)}")
        notes.append(note)
        if template is not None:
            notes.append("# Chat template: not kept (the processor lays the prompt out itself, as above).")
    elif (laid_out := format_template(folder, template, tokenizer)) is not None:
        lines.append(f"  chat_template = {quote(laid_out[0])}")
        notes.append(laid_out[1])
    elif template is not None and tokenizer is not None:
        exact = translate(template, tokenizer, image_token)
        if exact is not None:
            prompt, answer = exact
            lines += [f"  prompt = {quote(prompt)}", f"  answer = {quote(answer)}"]
            notes.append("# Chat template: translated into `prompt` and `answer`, which lay prompts and answers out exactly "
                         "as it does.")
        else:
            lines.append(f"  chat_template = {quote(template)}")
            notes.append("# Chat template: the checkpoint's Jinja template, kept as it is (`prompt` / `answer` cannot "
                         "express it exactly).")
    elif template is not None:
        notes.append("# Chat template: none kept (the folder has a template but no tokenizer to render it with).")
    stops = stop_tokens(folder, tokenizer)
    if stops:
        lines.append("  stop = [" + ", ".join(quote(s) for s in stops) + "]")
        notes.append("# `stop`: generation_config.json's eos_token_id.")
    return lines, notes

"""Text and images in, model inputs out: the spec's prompt template, image placeholders, padding, labels.

The number of image placeholder tokens per image comes from the compiler's shape inference, so the
"image features and image tokens do not match" class of runtime errors cannot happen here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmspec.compiler.compile import Analysis
from vlmspec.diagnostics import user_error
from vlmspec.runtime.connectors.base import Instruction
from vlmspec.runtime.decoding import prefix_from_labels
from vlmspec.runtime.inputs.encoder_images import encoders_transform
from vlmspec.runtime.inputs.images import (
    ImageInput,
    NativeImageTransform,
)
from vlmspec.runtime.inputs.longest_edge import LongestEdgeTransform, native_rows
from vlmspec.runtime.inputs.tiling import TiledImage
from vlmspec.runtime.inputs.token_count import ImageTokens

IGNORE = -100

#: How one image is written in a prompt: a count of image placeholders (None: the fusion's fixed count), or the
#: text a tile layout writes for it (InternVL's `<img>...</img>`, Idefics3's tiles with their row / column tokens)
ImageSlot = int | str | None


@dataclass(slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int] | None = None


class Processor:
    """Builds prompts from `settings.prompt` (`{image}`, `{q}`) and answers from `settings.answer` (`{a}`)."""

    def __init__(self, analysis: Analysis, tokenizer: Any, instruction_tokenizer: Any = None):
        self.analysis = analysis
        self.tokenizer = tokenizer
        # An instruction-aware Q-Former (InstructBLIP) reads the question in its own vocabulary (BERT's);
        # without that tokenizer the model runs without the instruction, as its encoder alone would.
        self.instruction_tokenizer = instruction_tokenizer if any(
            getattr(c.config, "instruction", False) for c in analysis.ir.by_role("connector")) else None
        ir = analysis.ir
        self.settings = ir.settings
        encoders = ir.by_role("vision")
        # one transform, or one per encoder when they read different sizes (DeepSeek-VL: SAM and SigLIP)
        self.transform = encoders_transform(encoders)
        # a tiled encoder's transform (Llama 3.2 Vision) cuts each image into up to `tiles` tiles and says
        # which layout it chose (the facts `image_kwargs` names)
        self.tiles = getattr(encoders[0].config, "tiles", 0) if encoders else 0
        fusions = ir.by_role("fusion")
        self.image_token = fusions[0].config.image_token if fusions else "<image>"
        # PaliGemma's prefix-LM: training batches say where each prompt ends (generate knows by itself)
        self.bidirectional_prefix = any(getattr(f.config, "prefix_attention", "causal") == "bidirectional"
                                        for f in fusions)
        # images are fed at image_size (a dynamic-resolution encoder's own shape counts its largest images)
        self.counts = ImageTokens(analysis)
        self.tokens_per_image = self.counts.at_size
        # an encoder with a tile layout (InternVL, Idefics3): the tokens of one tile after its connector
        self.tile_tokens = self.counts.tile_tokens
        # a dynamic-resolution encoder (Qwen2-VL): `generation_batch` feeds each image at the size its
        # checkpoint's processor gives it, with as many tokens as that size makes
        self.native: NativeImageTransform | None = None
        cfg = self.counts.cfg
        if self.counts.factor is not None and native_rows(cfg):  # Pixtral: longest edge, rows in the prompt
            self.native = LongestEdgeTransform(cfg, self.counts.factor)
        elif self.counts.factor is not None:
            res = cfg.resolution
            self.native = NativeImageTransform(cfg.image_size, list(cfg.mean), list(cfg.std), cfg.resize,
                                               self.counts.factor, res.min_pixels, res.max_pixels)
        vocab = tokenizer.get_vocab()
        if self.image_token not in vocab:
            raise user_error("E0511", f"the tokenizer has no `{self.image_token}` token",
                             help="add it as a special token, or set `image_token` on the fusion")
        self.image_token_id = vocab[self.image_token]
        lm = ir.language.config if ir.language else None
        self.max_length = self.settings.max_length or (lm.max_positions if lm else 2048)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    # ------------------------------------------------------------------ text
    def _system(self, system: str | None) -> str | None:
        """The system text: a conversation's own (a chat request's system message) over the spec's."""
        return system if system is not None else self.settings.system

    def _messages(self, turns: Sequence[tuple[str, str | None]], n_images: int,
                  system: str | None = None) -> list[dict[str, Any]]:
        """A conversation in transformers' chat format: the system text, then each question (the images
        before the first one's text) and answer (None: the turn awaits one)."""
        out: list[dict[str, Any]] = []
        if self._system(system):
            out.append({"role": "system", "content": [{"type": "text", "text": self._system(system)}]})
        for k, (question, answer) in enumerate(turns):
            images = [{"type": "image"}] * (n_images if k == 0 else 0)
            out.append({"role": "user", "content": [*images, {"type": "text", "text": question}]})
            if answer is not None:
                out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return out

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tokens: ImageSlot = None) -> str:
        """The spec's `chat_template` applied as transformers' `apply_chat_template` does (same renderer,
        the tokenizer's special tokens as variables), each image token then repeated once per visual token
        as the checkpoints' processors expand it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            text = render_jinja_template(conversations=[messages], chat_template=self.settings.chat_template,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.tokenizer.special_tokens_map)[0][0]
        except Exception as e:  # jinja2's syntax and undefined-variable errors, the template's raise_exception
            raise user_error("E0539", f"the spec's chat_template fails: {type(e).__name__}: {e}",
                             help="fix the template (Hugging Face's apply_chat_template format)") from None
        image = self.slot_text(tokens)
        return text.replace(self.image_token, image) if image != self.image_token else text

    def _template_ids(self, text: str, first: bool) -> list[int]:
        """Rendered text -> ids as transformers' processor tokenizes it: special tokens added to the
        first piece unless the template already starts with the BOS token."""
        bos = self.tokenizer.bos_token
        add = first and not (bos is not None and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add)["input_ids"])

    def prompt_text(self, question: str, n_images: int = 1, tokens: ImageSlot = None,
                    system: str | None = None) -> str:
        """The prompt, each image written as `tokens` says (default: `tokens_per_image` placeholders)."""
        if self.settings.chat_template is not None:
            return self.render(self._messages([(question, None)], n_images, system), add_generation_prompt=True,
                               tokens=tokens)
        image = self.slot_text(tokens)
        template = self.settings.prompt
        images = "".join([image] * n_images)
        if "{image}" in template:
            text = template.replace("{image}", images)
        else:
            text = images + template
        text = text.replace("{q}", question)
        if self._system(system):
            text = self._system(system) + "\n" + text
        return text

    def slot_text(self, tokens: ImageSlot) -> str:
        """The text one image stands for in the prompt (see `ImageSlot`)."""
        if isinstance(tokens, str):
            return tokens
        return self.image_token * (tokens or self.tokens_per_image)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, question: str, n_images: int = 1, tokens: ImageSlot = None,
                      system: str | None = None) -> list[int]:
        if self.settings.chat_template is not None:
            ids = self._template_ids(self.prompt_text(question, n_images, tokens, system), first=True)
        else:
            # a prompt that names the BOS token places it itself (BLIP-2's and PaliGemma's processors put
            # the image tokens before it); else it goes in front
            bos = self.tokenizer.bos_token
            named = isinstance(bos, str) and bool(bos) and bos in self.settings.prompt
            ids = ([self.bos_id] if self.bos_id is not None and not named else []) + \
                self._ids(self.prompt_text(question, n_images, tokens, system))
        return self._fits(ids)

    def _fits(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.max_length:
            raise user_error("E0504", f"the prompt is {len(ids)} tokens but the model's context is {self.max_length}",
                             help="shorten the prompt")
        return ids

    def encode_chat(self, turns: Sequence[tuple[str, str]], question: str, n_images: int = 1,
                    tokens: ImageSlot = None, system: str | None = None) -> list[int]:
        """The prompt of a conversation that goes on: earlier (question, answer) turns, the images in the
        first question, then `question` awaiting its answer; laid out as `encode_turns` lays out training
        conversations (the chat template rendered whole, or `prompt` / `answer` turn by turn, each answer
        ending with eos), with `system` (a chat request's system message) over the spec's."""
        if not turns:
            return self.encode_prompt(question, n_images, tokens, system)
        if self.settings.chat_template is not None:
            messages = self._messages([*turns, (question, None)], n_images, system)
            return self._fits(self._template_ids(self.render(messages, True, tokens), first=True))
        ids: list[int] = []
        for k, (q, a) in enumerate(turns):
            ids += self.encode_prompt(q, n_images, tokens, system) if k == 0 else \
                self._ids(self.prompt_text(q, 0, system=system))
            answer_ids = self._ids(self.settings.answer.replace("{a}", a))
            if self.eos_id is not None and (not answer_ids or answer_ids[-1] != self.eos_id):
                answer_ids.append(self.eos_id)
            ids += answer_ids
        return self._fits(ids + self._ids(self.prompt_text(question, 0, system=system)))

    def encode_example(self, question: str, answer: str, n_images: int = 1) -> Encoded:
        return self.encode_turns([(question, answer)], n_images)

    def encode_turns(self, turns: Sequence[tuple[str, str]], n_images: int = 1, tokens: ImageSlot = None) -> Encoded:
        """A multi-turn conversation: images in the first prompt (`tokens` placeholders each, default
        `tokens_per_image`), loss on every answer."""
        if self.settings.chat_template is not None:
            return self._encode_template_turns(turns, n_images, tokens)
        ids: list[int] = []
        labels: list[int] = []
        for k, (question, answer) in enumerate(turns):
            if k == 0:
                prompt = self.encode_prompt(question, n_images, tokens)
            else:
                prompt = self._ids(self.prompt_text(question, 0))
            answer_ids = self._ids(self.settings.answer.replace("{a}", answer))
            if self.eos_id is not None and (not answer_ids or answer_ids[-1] != self.eos_id):
                answer_ids.append(self.eos_id)
            ids += prompt + answer_ids
            labels += [IGNORE] * len(prompt) + answer_ids
        return Encoded(ids[: self.max_length], labels[: self.max_length])

    def _encode_template_turns(self, turns: Sequence[tuple[str, str]], n_images: int,
                               tokens: ImageSlot = None) -> Encoded:
        """The conversation rendered by the chat template, cut where each answer starts and ends (the
        template rendered up to each question with the generation prompt, then with the answer): loss on
        the answers, the end-of-sequence token appended to one the template does not end with it."""
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for k in range(len(turns)):
            asked = self.render(self._messages([*turns[:k], (turns[k][0], None)], n_images), True, tokens)
            answered = self.render(self._messages(turns[: k + 1], n_images), False, tokens)
            if not (asked.startswith(done) and answered.startswith(asked)):
                raise user_error("E0539", "the spec's chat_template does not render a conversation turn by turn "
                                 "(an earlier turn changes when a later one is added)",
                                 help="train with `prompt` and `answer` instead")
            prompt = self._template_ids(asked[len(done):], first=k == 0)
            answer_ids = self._ids(answered[len(asked):])
            if self.eos_id is not None and (not answer_ids or answer_ids[-1] != self.eos_id):
                answer_ids.append(self.eos_id)
            ids += prompt + answer_ids
            labels += [IGNORE] * len(prompt) + answer_ids
            done = answered
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ batches
    def images(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, facts): `[b x c x h x w]`, or `[b x tiles x c x h x w]` with each image's facts
        (a tiled encoder's layout ids, an anyres encoder's image sizes; else None) for `image_kwargs`."""
        if self.transform is None or not images:
            return None, None
        return self.transform.batch(list(images))

    def image_kwargs(self, facts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The model's keyword argument for the facts `images` / `stack` give beside the pixels
        (`aspect_ratio_ids` of a tiled encoder, `image_sizes` of an anyres one), or none."""
        key = getattr(self.image_transform, "facts", None)
        return {key: facts} if key is not None and facts is not None else {}

    def stack(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image transform's outputs (one per image, as `transform(image)` gave them) -> a batch."""
        if self.transform is None:
            raise user_error("E0505", "this model has no vision encoder to read images")
        return self.image_transform.stack(list(items))

    def left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> (input_ids, attention_mask), `[b x longest]`, padded on the left for generation."""
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
        return input_ids, mask

    def instruction(self, questions: Sequence[str]) -> Instruction | None:
        """The questions in the instruction-aware connector's vocabulary, right-padded (Hugging Face's
        `qformer_input_ids` / `qformer_attention_mask`); None when the model has no such connector or no
        tokenizer for it."""
        if self.instruction_tokenizer is None:
            return None
        enc = self.instruction_tokenizer(list(questions), padding=True, return_tensors="pt")
        return Instruction(enc["input_ids"], enc["attention_mask"])

    @property
    def image_transform(self) -> Any:
        """One image -> what the model reads of it: at its own processor size for a dynamic-resolution
        encoder (`NativeImageTransform`), else the encoder's fixed transform (None without an encoder)."""
        return self.native if self.native is not None else self.transform

    @property
    def laid_out(self) -> Any:
        """The transform of an encoder with an image layout (`anyres`: LLaVA-NeXT, OneVision; `dynamic_tiles`:
        InternVL; `split`: Idefics3 / SmolVLM), whose images take as many tokens as their size makes; None
        for any other."""
        return self.transform if not isinstance(getattr(self.transform, "layout", "fixed"), str) else None

    def image_tokens(self, pixels: Any) -> int:
        """How many placeholder tokens one transformed image takes in the prompt (a native-size or laid-out
        image takes as many as its size makes; every other image the fusion's fixed count)."""
        if isinstance(pixels, TiledImage):
            return self.laid_out.tokens(pixels, self.tile_tokens)
        if self.laid_out is not None:
            return self.laid_out.tokens(pixels)
        if self.native is None or not isinstance(pixels, torch.Tensor):
            return self.tokens_per_image
        return self.counts.native(*pixels.shape[-2:])

    def image_slot(self, pixels: Any) -> ImageSlot:
        """How one transformed image is written in the prompt: a tile layout's text, else its token count."""
        if isinstance(pixels, TiledImage):
            return self.laid_out.prompt(pixels, self.image_token, self.tile_tokens)
        if isinstance(self.native, LongestEdgeTransform) and isinstance(pixels, torch.Tensor):
            return self.native.prompt(pixels, self.image_token)  # Pixtral's rows with break / end tokens
        return self.image_tokens(pixels)

    def size_groups(self, images: Sequence[ImageInput]) -> list[list[int]]:
        """Indices of `images` in groups one forward can take together: one group, except that a
        dynamic-resolution encoder reads each image at its own size, and a batch holds one size; a laid-out
        encoder's images are grouped by token count (a batch could mix counts, but equal prompts pad least
        and keep each row's tiles and tokens as its own batch of one would have them)."""
        if self.native is None and self.laid_out is None:
            return [list(range(len(images)))]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            key = (self.image_tokens(self.laid_out(img)),) if self.laid_out is not None else \
                tuple(self.native(img).shape)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def generation_batch(self, questions: Sequence[str], images: Sequence[ImageInput] | None) -> dict[str, Any]:
        """Left-padded prompts (one image per prompt when images are given) for `model.generate`. A
        dynamic-resolution encoder reads each image at its processor's size (`NativeImageTransform`):
        the images of one batch must come out the same size (`size_groups` splits them)."""
        if images and self.laid_out is not None:
            return self._laid_out_batch(questions, images)
        if images and self.native is not None:
            items = [self.native(i) for i in images]
            sizes = {tuple(x.shape[-2:]) for x in items}
            if len(sizes) > 1:
                raise user_error("E0593", f"images of {len(sizes)} sizes in one batch ("
                                 + ", ".join(f"{w}x{h}" for h, w in sorted(sizes)) + "): this model reads each image "
                                 "at its own size", help="batch the images of one size together (`size_groups`)")
            tokens = self.image_slot(items[0])
            input_ids, mask = self.left_pad([self.encode_prompt(q, 1, tokens) for q in questions])
            batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.stack(items)}
            instruction = self.instruction(questions)
            if instruction is not None:
                batch["instruction"] = instruction
            return batch
        input_ids, mask = self.left_pad([self.encode_prompt(q, 1 if images else 0) for q in questions])
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            batch["pixel_values"], facts = self.images(images)
            batch.update(self.image_kwargs(facts))
            instruction = self.instruction(questions)
            if instruction is not None:
                batch["instruction"] = instruction
        return batch

    def _laid_out_batch(self, questions: Sequence[str], images: Sequence[ImageInput]) -> dict[str, Any]:
        """`generation_batch` for a laid-out encoder: each prompt with as many placeholders as its image's size
        makes (`size_groups` still batches equal counts together, which pads least), with the images'
        sizes."""
        items = [self.laid_out(i) for i in images]
        input_ids, mask = self.left_pad([self.encode_prompt(q, 1, self.image_slot(x))
                                         for q, x in zip(questions, items, strict=True)])
        pixels, sizes = self.stack(items)
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}

    def training_batch(self, examples: Sequence[Encoded], pixel_values: torch.Tensor | None,
                       facts: torch.Tensor | None = None) -> dict[str, Any]:
        """Right-padded ids and labels (-100 on prompt and padding) for the causal LM loss; for a
        bidirectional prefix (`prefix_attention = bidirectional`) also `prefix_mask`, True on each prompt
        (the tokens before the first answer token), which the model reads since the loss may be taken
        outside it (labels popped)."""
        if getattr(self.analysis.ir.language.config, "encoder_decoder", False):  # t5: prompt to the encoder, answer
            from vlmspec.runtime.encoder_decoder import seq2seq_training_batch  # to the decoder

            return seq2seq_training_batch(self, examples, pixel_values, facts)
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels if e.labels is not None else e.input_ids)
            mask[i, :n] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.bidirectional_prefix:
            batch["prefix_mask"] = prefix_from_labels(labels) & mask.bool()
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        batch.update(self.image_kwargs(facts))
        return batch

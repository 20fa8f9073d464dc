"""`EncoderDecoderVLM`: a vision-language model whose language model is an encoder-decoder (`t5`).

It is `VisionLanguageModel` plus deltas, as transformers' `modular_*.py` files read: the images are encoded
the same way (`encode_images`), and the `prefix` fusion's image features are spliced into the prompt's
embeddings the same way (`embed`), but that sequence is the ENCODER's input (BLIP-2 Flan-T5: the Q-Former's
projected queries in front of the prompt's text, one mask over both). The answer is the decoder's: it
starts from the model's `decoder_start` token and reads the encoder's output through cross-attention.

Batches. The prompt (`input_ids`, `attention_mask`, images) goes to the encoder; the decoder reads
`decoder_input_ids` = [start, a1, ..., an] with `labels` = [-100, a1, ..., an] laid out as a causal LM's
(each label is the token its position's input is, so position t predicts label t + 1): `label_targets`,
`causal_lm_loss` and the trainer's token counting read them as they read a decoder-only batch's
(`decoder_batch` builds them from answers).

Generation. The encoder runs once; `Seq2SeqStepper` steps the decoder (its self-attention cache grows, the
cross-attention keys and values are computed once), driven by `runtime/generate.py`'s greedy, sampling and
beam-search loops, so `generate` returns what every caller reads: the new tokens [b x n].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.connectors.base import Instruction
from vlmspec.runtime.decoding import KVCache
from vlmspec.runtime.model import IGNORE_INDEX, VisionLanguageModel, VLMOutput, causal_lm_loss, label_targets

__all__ = ["EncoderDecoderVLM", "Seq2SeqStepper", "decoder_batch", "seq2seq_training_batch"]


def decoder_batch(answers: list[list[int]], start: int, pad: int) -> tuple[Tensor, Tensor]:
    """(decoder_input_ids, labels) [b x (1 + longest)] of answers (token ids, eos included): each row
    [start, a1, ..., an] right-padded with `pad`, its labels [-100, a1, ..., an] padded with -100."""
    width = 1 + max((len(a) for a in answers), default=0)
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    labels = torch.full((len(answers), width), IGNORE_INDEX, dtype=torch.long)
    ids[:, 0] = start
    for i, a in enumerate(answers):
        if a:
            ids[i, 1: 1 + len(a)] = torch.tensor(a)
            labels[i, 1: 1 + len(a)] = torch.tensor(a)
    return ids, labels


class EncoderDecoderVLM(VisionLanguageModel):
    """A VLM over an encoder-decoder language model; `components[name]` as in `VisionLanguageModel`."""

    @property
    def bidirectional_prefix(self) -> bool:
        return False  # the encoder reads the whole prompt both ways; the decoder's tokens are all causal

    @property
    def stepper_class(self) -> type:
        """What `runtime/generate.py` steps: the decoder, over the encoder's output."""
        return Seq2SeqStepper

    def _check_length(self, n: int, what: str) -> None:
        limit = self.llm.c.max_positions
        if n > limit:
            raise user_error("E0514", f"{n} {what} tokens exceed the language model's max_positions = {limit}",
                             help="shorten the prompt or max_new_tokens")

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None, features: dict[str, Tensor]) -> Tensor:
        """The encoder's output [b x s x w] over the prompt with the image features in place of its image tokens."""
        self._check_length(input_ids.shape[1], "prompt")
        return self.llm.encode(self.embed(input_ids, features), attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | dict[str, Tensor] | None = None, labels: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, cache: KVCache | None = None,
                image_features: dict[str, Tensor] | None = None, encoder_output: Tensor | None = None,
                logits_to_keep: int = 0, logits_for: str = "all", instruction: Instruction | None = None,
                aspect_ratio_ids: Tensor | None = None, image_sizes: Tensor | None = None,
                segment_ids: Tensor | None = None, **decoder_only: Any) -> VLMOutput:
        """input_ids [b x s] / attention_mask: the prompt (with its image tokens), read by the encoder;
        decoder_input_ids [b x t]: the decoder's input (default: the start token alone); labels [b x t] laid
        out as a causal LM's over decoder_input_ids (see the module docstring), or, without decoder_input_ids,
        transformers' targets (the decoder reads them shifted right after the start token, and the logits
        have one row per target); encoder_output: the encoder's output when it already ran (generation).
        Other arguments as `VisionLanguageModel.forward`; those that only a decoder-only model reads
        (prefix_mask, image_mask, position_ids, segment_ids) are refused if given."""
        given = [k for k, v in decoder_only.items() if v is not None]
        if given or segment_ids is not None:
            raise user_error("E0562", f"an encoder-decoder language model does not read {', '.join(given) or 'segment_ids'}"
                             " (the encoder attends over the whole prompt, the decoder causally)",
                             help="packing and prefix masks are for decoder-only language models")
        if encoder_output is None:
            features = image_features
            if features is None and pixel_values is not None:
                features = self.encode_images(pixel_values, instruction, aspect_ratio_ids, image_sizes)
            encoder_output = self.encode(input_ids, attention_mask, features or {})
        targets_only = decoder_input_ids is None and labels is not None
        if targets_only:  # transformers' convention: labels are the decoder's targets, its input shifted right
            start = labels.new_full((labels.shape[0], 1), self.llm.c.decoder_start)
            # an ignored target is read as the start token (T5's pad), as transformers' `_shift_right` reads it
            decoder_input_ids = torch.cat([start, labels.masked_fill(labels == IGNORE_INDEX, int(start[0, 0]))], dim=1)
            labels = torch.cat([torch.full_like(start, IGNORE_INDEX), labels], dim=1)
        elif decoder_input_ids is None:
            decoder_input_ids = input_ids.new_full((input_ids.shape[0], 1), self.llm.c.decoder_start)
        past = cache.length() if cache is not None else 0
        self._check_length(past + decoder_input_ids.shape[1], "answer")
        h = self.llm.decode(decoder_input_ids, encoder_output, attention_mask, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        targets = None
        if labels is not None and logits_for == "labels":
            if labels.shape != decoder_input_ids.shape:
                raise user_error("E0515", f"labels have shape {tuple(labels.shape)} but decoder_input_ids "
                                 f"{tuple(decoder_input_ids.shape)}")
            keep, targets = label_targets(labels.to(h.device))
            h = h[keep]
        elif logits_for not in ("all", "labels"):
            raise ValueError(f"logits_for must be 'all' or 'labels', not {logits_for!r}")
        logits = self.llm.logits(h)
        loss = None
        if labels is not None:
            if targets is not None:
                loss = F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
            else:
                loss = causal_lm_loss(logits, labels)
        if targets_only and targets is None:
            logits = logits[:, :-1]  # one row per target, as transformers gives them
        return VLMOutput(logits, loss, None, cache)


class Seq2SeqStepper:
    """`runtime/generate.py`'s stepper for an encoder-decoder: the encoder's output once, then the decoder
    from the start token, one new token a step (with the cache) or the whole answer so far (without)."""

    def __init__(self, model: EncoderDecoderVLM, ids: Tensor, mask: Tensor, features: dict[str, Tensor],
                 use_cache: bool, max_new: int):
        self.model = model
        self.enc = model.encode(ids, mask, features)
        self.enc_mask = mask
        self.ids = ids.new_full((ids.shape[0], 1), model.llm.c.decoder_start)
        self.pending = self.ids
        self.cache = KVCache(reserve=max_new + 1) if use_cache else None

    def next_logits(self) -> Tensor:
        """[b x vocab] float32 logits for the next answer token."""
        ids = self.pending if self.cache is not None else self.ids
        out = self.model(ids, attention_mask=self.enc_mask, decoder_input_ids=ids, encoder_output=self.enc,
                         cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def append(self, tokens: Tensor) -> None:
        col = tokens[:, None].to(self.ids.dtype)
        self.ids = torch.cat([self.ids, col], dim=1)
        self.pending = col

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search)."""
        self.ids, self.enc, self.enc_mask = (t.index_select(0, index) for t in (self.ids, self.enc, self.enc_mask))
        if self.cache is not None:
            self.cache.reorder(index)


def seq2seq_training_batch(processor: Any, examples: list[Any], pixel_values: Tensor | None,
                           facts: Tensor | None = None) -> dict[str, Any]:
    """`Processor.training_batch` for an encoder-decoder: each example's prompt (the tokens before its answer,
    image placeholders included) right-padded into `input_ids` / `attention_mask` for the encoder, its answer
    into `decoder_input_ids` / `labels` (`decoder_batch`). The labels count the answer tokens the trainer
    counts in the example's causal layout, so its token-weighted loss is unchanged."""
    prompts, answers = [], []
    for e in examples:
        labels = e.labels if e.labels is not None else [IGNORE_INDEX] * len(e.input_ids)
        k = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        if any(x == IGNORE_INDEX for x in labels[k:]):
            raise user_error("E0563", "an encoder-decoder language model trains on one prompt and one answer per "
                             "sample; this sample is a conversation of several turns",
                             help="give each turn as a sample of its own (the encoder reads the prompt, the decoder "
                             "writes the answer)")
        prompts.append(e.input_ids[:k])
        answers.append(list(labels[k:]))
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(examples), width), processor.pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, : len(p)] = 1
    start = processor.analysis.ir.language.config.decoder_start
    decoder_input_ids, labels = decoder_batch(answers, start, processor.pad_id)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids,
                             "labels": labels}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    batch.update(processor.image_kwargs(facts))
    return batch

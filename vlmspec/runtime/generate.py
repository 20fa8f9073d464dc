"""Text generation: greedy, sampling (temperature, top-p, a local seeded generator) and beam search,
with or without the KV cache, for batched left-padded prompts.

One `Stepper` hides the difference between cached decoding (feed only the new token) and recomputing
the whole sequence, so both paths share the decoding loops and must produce the same tokens.
Images are encoded once, before the first step, either way. With a bidirectional prefix
(`prefix_attention = bidirectional`, PaliGemma) the whole prompt is the prefix and every generated
token is causal, as Hugging Face does with the processor's `token_type_ids`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.diagnostics import user_error
from vlmspec.runtime.decoding import KVCache

if TYPE_CHECKING:
    from vlmspec.runtime.connectors.base import Instruction
    from vlmspec.runtime.model import VisionLanguageModel


class Stepper:
    """The growing sequence and how to get the next-token logits for it."""

    def __init__(self, model: VisionLanguageModel, ids: Tensor, mask: Tensor, features: dict[str, Tensor],
                 use_cache: bool, max_new: int):
        self.model = model
        self.ids, self.mask, self.features = ids, mask, features
        self.cache = KVCache(reserve=ids.shape[1] + max_new) if use_cache else None
        self.pending = ids  # tokens the cache has not seen yet
        self.prompt = ids.shape[1]  # the prompt is the (bidirectional) prefix; generated tokens are not

    def _prefix(self, s: int) -> Tensor | None:
        """[b x s] prefix mask of the last s tokens of the sequence (None: the model attends causally)."""
        if not self.model.bidirectional_prefix:
            return None
        n = self.ids.shape[1]
        return (torch.arange(n - s, n, device=self.ids.device) < self.prompt)[None].expand(self.ids.shape[0], -1)

    def next_logits(self) -> Tensor:
        """[b x vocab] float32 logits for the next position."""
        if self.cache is not None:
            first = self.cache.length() == 0
            out = self.model(self.pending, attention_mask=self.mask, image_features=self.features if first else None,
                             cache=self.cache, logits_to_keep=1, prefix_mask=self._prefix(self.pending.shape[1]))
        else:  # recomputed: images are where the prompt put them (a generated image token is text)
            images = self.ids == self.model.image_token_id
            images[:, self.prompt:] = False
            out = self.model(self.ids, attention_mask=self.mask, image_features=self.features, logits_to_keep=1,
                             prefix_mask=self._prefix(self.ids.shape[1]), image_mask=images)
        return out.logits[:, -1].float()

    def append(self, tokens: Tensor) -> None:
        """tokens: [b]."""
        col = tokens[:, None].to(self.ids.dtype)
        self.ids = torch.cat([self.ids, col], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(col, dtype=self.mask.dtype)], dim=1)
        self.pending = col

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search)."""
        self.ids, self.mask = self.ids.index_select(0, index), self.mask.index_select(0, index)
        self.features = {k: v.index_select(0, index) for k, v in self.features.items()}
        if self.cache is not None:
            self.cache.reorder(index)


def _stepper(model: VisionLanguageModel) -> type:
    """The model's own stepper (an encoder-decoder steps its decoder: `EncoderDecoderVLM.stepper_class`), else
    `Stepper`."""
    return getattr(model, "stepper_class", Stepper)


def _check(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, num_beams: int) -> None:
    if max_new_tokens < 0:
        raise user_error("E0517", f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise user_error("E0517", f"temperature must be > 0 when sampling, got {temperature}",
                         help="use do_sample=False for greedy decoding")
    if not 0 < top_p <= 1:
        raise user_error("E0517", f"top_p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise user_error("E0517", f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise user_error("E0517", "beam search with sampling is not supported", help="use num_beams=1 to sample")


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """probs [b x vocab] with the tokens outside the nucleus zeroed: the nucleus is the smallest set of
    most likely tokens whose mass is >= top_p, as in Hugging Face's `TopPLogitsWarper`, i.e. a token stays
    when the tokens more likely than it hold less than top_p (so the most likely one always does)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = F.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))  # mass of the more likely tokens (exclusive cumsum)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(before >= top_p, 0.0))


def sample_top_p(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token per row of float32 logits [b x vocab] from softmax(logits / T) within the top-p
    nucleus (`top_p_filter`; top_p = 1: the whole vocabulary). -> [b].

    The one sampler of generation and serving. It draws only from `generator`; the serving engine
    calls it per row with the row's own, so a seeded request's tokens do not depend on its batch-mates.
    """
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: VisionLanguageModel, input_ids: Tensor, *, attention_mask: Tensor | None = None,
             pixel_values: Tensor | dict[str, Tensor] | None = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
             eos_token_id: int | list[int] | None = None, seed: int | None = None, use_cache: bool = True,
             image_features: dict[str, Tensor] | None = None, pad_token_id: int | None = None,
             instruction: Instruction | None = None, aspect_ratio_ids: Tensor | None = None,
             image_sizes: Tensor | None = None) -> Tensor:
    """New tokens [b x n] (n <= max_new_tokens; rows that stopped early are filled with the pad token,
    which defaults to the first eos id, else 0). The image placeholder is never generated.
    instruction: the instruction of an instruction-aware connector (InstructBLIP); aspect_ratio_ids:
    the tile layouts of a tiled encoder's images (Llama 3.2 Vision); image_sizes: the (height, width) of an
    any-resolution encoder's images; see `forward`."""
    _check(max_new_tokens, do_sample, temperature, top_p, num_beams)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values, instruction, aspect_ratio_ids, image_sizes)
    features = image_features or {}
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    banned = [model.image_token_id] if model.in_sequence else []
    if banned and getattr(model, "video_token_id", None) is not None:  # nor the video placeholder
        banned.append(model.video_token_id)
    if num_beams > 1:
        return _beam_search(model, input_ids, mask, features, max_new_tokens, num_beams, eos, pad, banned, use_cache)
    stepper = _stepper(model)(model, input_ids, mask, features, use_cache, max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed)
    b = input_ids.shape[0]
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out: list[Tensor] = []
    for _ in range(max_new_tokens):
        logits = stepper.next_logits()
        if banned:
            logits[:, banned] = float("-inf")
        tok = sample_top_p(logits, temperature, top_p, generator) if do_sample else logits.argmax(-1)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        out.append(tok)
        if eos:
            finished |= torch.isin(tok, eos_t)
            if bool(finished.all()):
                break
        stepper.append(tok)
    if not out:
        return input_ids.new_empty(b, 0)
    return torch.stack(out, dim=1)


def _beam_search(model: VisionLanguageModel, ids: Tensor, mask: Tensor, features: dict[str, Tensor],
                 max_new: int, k: int, eos: list[int], pad: int, banned: list[int], use_cache: bool,
                 length_penalty: float = 1.0) -> Tensor:
    """Beam search as Hugging Face does it without early stopping: 2k candidates per step, a hypothesis
    ends at eos (scored log-prob / generated length ** length_penalty), a prompt is done when its k best
    finished hypotheses beat every running beam."""
    b = ids.shape[0]
    dev = ids.device
    stepper = _stepper(model)(model, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0),
                      {f: x.repeat_interleave(k, 0) for f, x in features.items()}, use_cache, max_new)
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    seqs = ids.new_empty(b * k, 0)
    hyps: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
    done = [False] * b
    for t in range(max_new):
        logp = F.log_softmax(stepper.next_logits(), dim=-1)
        if banned:
            logp[:, banned] = float("-inf")
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(b, k, vocab)).view(b, k * vocab)
        top_s, top_i = cand.topk(2 * k, dim=1)
        new_scores = scores.clone()
        new_beam = torch.arange(k, device=dev).repeat(b, 1)
        new_tok = torch.full((b, k), pad, dtype=ids.dtype, device=dev)
        for bi in range(b):
            if done[bi]:
                continue
            j = 0
            for rank in range(2 * k):
                s, beam, tok = float(top_s[bi, rank]), int(top_i[bi, rank]) // vocab, int(top_i[bi, rank]) % vocab
                if tok in eos:
                    if rank < k:
                        seq = torch.cat([seqs[bi * k + beam], seqs.new_tensor([tok])])
                        _add(hyps[bi], s / (t + 1) ** length_penalty, seq, k)
                    continue
                new_scores[bi, j], new_beam[bi, j], new_tok[bi, j] = s, beam, tok
                j += 1
                if j == k:
                    break
            if len(hyps[bi]) >= k and hyps[bi][-1][0] >= float(new_scores[bi].max()) / (t + 1) ** length_penalty:
                done[bi] = True
        index = (torch.arange(b, device=dev)[:, None] * k + new_beam).view(-1)
        seqs = torch.cat([seqs.index_select(0, index), new_tok.view(-1, 1)], dim=1)
        scores = new_scores
        if all(done) or t == max_new - 1:
            break
        stepper.reorder(index)
        stepper.append(new_tok.view(-1))
    n = seqs.shape[1]
    for bi in range(b):
        if not done[bi]:
            for j in range(k):
                _add(hyps[bi], float(scores[bi, j]) / max(n, 1) ** length_penalty, seqs[bi * k + j], k)
    best = [max(h, key=lambda x: x[0])[1] if h else seqs.new_empty(0) for h in hyps]
    width = max((len(x) for x in best), default=0)
    out = torch.full((b, width), pad, dtype=ids.dtype, device=dev)
    for bi, seq in enumerate(best):
        out[bi, : len(seq)] = seq
    return out


def _add(hyps: list[tuple[float, Tensor]], score: float, seq: Tensor, k: int) -> None:
    """Keep the k best finished hypotheses, best first."""
    hyps.append((score, seq))
    hyps.sort(key=lambda x: -x[0])
    del hyps[k:]

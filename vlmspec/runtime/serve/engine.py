"""The serving engine: a bounded queue in front of one decode thread that batches continuously.

The decode thread keeps a running batch and, at every decode step, (1) admits waiting requests:
they are prefilled together (left-padded among themselves) and their KV-cache rows are merged into
the running batch; (2) picks one token for every row; (3) retires the rows that finished (eos, stop
string, max_tokens, full context), dropping their cache rows, so nobody waits for the slowest member
of a batch; (4) runs one batched forward for the rows that remain.

Rows of different lengths share a cache by left padding: the shorter side is padded with zeros on
the left of the sequence axis and with 0 in the attention mask, which `attention_mask_4d` masks out
and `default_position_ids` skips, so every row sees the positions (and, greedy, the tokens) it would
see alone. Columns that are padding in every row are cut when rows retire, so a batch is never wider
than its longest row.

Arrivals are admitted once they fill the free places or the first of them has waited `max_wait_ms`
(20 ms by default) for company: one prefill for a few arrivals costs much less than one each, and
every prefill stalls the running rows for its duration. Measured on the tiny LLaVA with 8 clients,
20 ms gives 10-30% more requests/s than 5 ms, with lower p50 latency too (fewer, fuller prefills);
`--max-wait-ms 0` admits at the next step, for the lowest time to first token at low load.

Preprocessed images are cached by content hash, so the same picture asked about twice is decoded
once. A full queue refuses new work (the server answers 503) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmspec.runtime.decoding import KVCache
from vlmspec.runtime.devices import move
from vlmspec.runtime.generate import sample_top_p
from vlmspec.runtime.inputs.images import open_image

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session


class QueueFull(Exception):
    """The server is at capacity; the client should retry later (HTTP 503)."""


@dataclass(slots=True)
class GenRequest:
    question: str
    image: bytes | None
    system: str | None = None  # the request's system message (None: the spec's `system`)
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (question, answer) turns
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    # filled in by the engine
    ids: list[int] | None = None
    pixels: Any = None  # the image transform's output (a tensor, or `Tiles` for a tiled encoder)
    output_ids: list[int] = field(default_factory=list)  # generated tokens, without the final eos
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "length"
    error: Exception | None = None
    enqueued: float = 0.0  # submitted
    queued: float = 0.0  # prepared, handed to the decode thread
    first_token: float | None = None
    done: asyncio.Event | None = None
    deltas: asyncio.Queue | None = None


@dataclass(slots=True)
class Stats:
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    tokens: int = 0
    batches: int = 0  # prefills: groups of arrivals admitted together
    batched_rows: int = 0  # requests admitted by those prefills
    steps: int = 0  # batched decode forwards
    step_rows: int = 0  # rows over those forwards (step_rows / steps = mean running batch)
    running: int = 0  # requests decoding now
    cache_hits: int = 0
    cache_misses: int = 0
    latency_sum: float = 0.0
    ttft_sum: float = 0.0


class ImageCache:
    """LRU of preprocessed pixel tensors, keyed by the sha256 of the image bytes."""

    def __init__(self, transform: Callable[[Any], Any], capacity: int = 256):
        self.transform = transform
        self.capacity = capacity
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, data: bytes, stats: Stats, max_pixels: int) -> Any:
        key = hashlib.sha256(data).hexdigest()
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                stats.cache_hits += 1
                return self.items[key]
        pixels = self.transform(open_image(data, max_pixels=max_pixels))
        with self.lock:
            stats.cache_misses += 1
            self.items[key] = pixels
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return pixels


# ---------------------------------------------------------------- the running batch


@dataclass(slots=True)
class Row:
    """One request in a running batch, with its own sampler so batch-mates never shift its random stream."""

    req: GenRequest
    gen: torch.Generator
    done: bool = False


@dataclass(slots=True)
class Batch:
    """Requests that decode together: row i of `cache`, `mask` and `logits` belongs to `rows[i]`.

    mask: [b x width] 1 = real token, 0 = left padding; logits: [b x vocab], each row's next-token logits.
    """

    rows: list[Row]
    cache: KVCache
    mask: Tensor
    logits: Tensor

    def merge(self, other: Batch, reserve: int) -> None:
        """Append `other`'s rows (just prefilled) to this batch, left-padding the narrower side."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.cache = merge_caches(self.cache, other.cache, width, reserve)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows

    def keep(self, index: list[int], reserve: int) -> None:
        """Keep only rows `index`, dropping the sequence columns that are now padding in every row."""
        idx = torch.tensor(index, device=self.mask.device)
        self.rows = [self.rows[i] for i in index]
        self.mask = self.mask.index_select(0, idx)
        lead = int(self.mask.any(0).long().argmax())  # real tokens are right-aligned: the last column is real
        self.mask = self.mask[:, lead:]
        self.cache = select_rows(self.cache, idx, lead, reserve)
        self.logits = self.logits.index_select(0, idx.cpu())

    def compatible(self, other: Batch) -> bool:
        """Batches can merge when they hold the same per-row state besides self-attention K/V, with the
        same shapes: not when only one has cross-attention K/V of images (a request without an image
        skips those layers), nor while one holds state of a whole prompt and the other of one token."""
        return _row_state(self.cache) == _row_state(other.cache)


def _row_state(cache: KVCache) -> dict[str, tuple[int, ...]]:
    """The cache's per-row state besides self-attention K/V, by name, with its shape past the batch axis."""
    return {**{f"cross.{n}": tuple(k.shape[1:]) for n, (k, _) in cache.cross.items()},
            **{f"extras.{n}": tuple(t.shape[1:]) for n, t in cache.extras.items()}}


def _pad_left(x: Tensor, width: int, dim: int = -1) -> Tensor:
    """Zeros on the left of `dim` up to `width`. Zeros, not empty memory: a masked key still multiplies
    its (zero) attention weight into the output, and 0 * NaN would poison the row."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge_caches(a: KVCache, b: KVCache, width: int, reserve: int) -> KVCache:
    """One cache with a's rows then b's, each left-padded to `width` positions; room for `reserve`."""
    out = KVCache(reserve=max(reserve, width))
    for i in a.layer_ids():
        (ka, va), (kb, vb) = a.layer(i), b.layer(i)
        out.update(i, torch.cat([_pad_left(ka, width, 2), _pad_left(kb, width, 2)]),
                   torch.cat([_pad_left(va, width, 2), _pad_left(vb, width, 2)]))
    out.cross = {n: (torch.cat([k, b.cross[n][0]]), torch.cat([v, b.cross[n][1]])) for n, (k, v) in a.cross.items()}
    out.extras = {n: torch.cat([t, b.extras[n]]) for n, t in a.extras.items()}
    return out


def select_rows(cache: KVCache, index: Tensor, lead: int, reserve: int) -> KVCache:
    """Rows `index` of `cache` without its first `lead` positions (padding in every kept row)."""
    out = KVCache(reserve=reserve)
    for i in cache.layer_ids():
        k, v = cache.layer(i)
        out.update(i, k.index_select(0, index)[:, :, lead:], v.index_select(0, index)[:, :, lead:])
    out.cross = {n: (k.index_select(0, index), v.index_select(0, index)) for n, (k, v) in cache.cross.items()}
    out.extras = {n: t.index_select(0, index) for n, t in cache.extras.items()}
    return out


# ---------------------------------------------------------------- the engine


class Engine:
    """Owns the model: `submit` prepares a request and queues it; the decode thread (`_serve_forever`)
    batches it with the others and streams its text to the request's `deltas`, on the event loop."""

    def __init__(self, session: Session, max_batch: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                 max_pixels: int = 16 * 1024 * 1024):
        # a language model whose rows this engine cannot step (t5) says why
        refusal = getattr(getattr(session.model, "llm", None), "serve_refusal", None)
        if refusal:
            from vlmspec.diagnostics import user_error

            raise user_error("E0564", f"vlm serve: {refusal}", help="answer with `vlm generate` or `vlm eval`, "
                             "which run encoder-decoder models")
        self.model = session.model
        self.device = session.device
        self.processor = session.require_processor()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_pixels = max_pixels
        self.stats = Stats()
        self.images = ImageCache(self.processor.image_transform) if self.processor.transform is not None else None
        facts = session.facts
        self.stop_ids = set(facts.stop_ids)  # the token ids `inference.answer` stops at
        self.banned = facts.banned_id  # what `model.generate` never produces
        self.max_positions = facts.max_positions
        self.batches: list[Batch] = []  # decode thread only; more than one only when rows cannot merge
        self.incoming: queue.SimpleQueue[GenRequest | None] = queue.SimpleQueue()  # prepared, not yet admitted
        self.held: list[GenRequest] = []  # decode thread only: taken from `incoming`, waiting to be admitted
        self.preparing = 0  # event loop only
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.halt = threading.Event()
        self._pending: list[tuple[GenRequest, str | None]] = []  # this step's deltas, delivered together

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.halt.clear()
        self.thread = threading.Thread(target=self._serve_forever, name="vlmspec-decode", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        if self.thread is not None:
            self.halt.set()
            self.incoming.put(None)  # wakes an idle thread
            await asyncio.to_thread(self.thread.join, 10)
            self.thread = None

    def depth(self) -> int:
        """Requests admitted and not yet decoding (being prepared, or waiting for a place in the batch)."""
        return self.preparing + self.incoming.qsize() + len(self.held)

    async def submit(self, req: GenRequest) -> GenRequest:
        if self.thread is None:
            await self.start()
        if self.depth() >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull
        req.enqueued = time.perf_counter()
        self.stats.requests += 1
        self.preparing += 1
        try:
            # decode the image and tokenize the prompt off the model's thread, in parallel with decoding;
            # a bad image is then a 400 before the request ever waits in the queue
            await asyncio.to_thread(self._prepare, req)
        except Exception:
            self.stats.errors += 1
            raise
        finally:
            self.preparing -= 1
        req.done = asyncio.Event()
        req.deltas = asyncio.Queue()
        req.queued = time.perf_counter()
        self.incoming.put(req)
        return req

    def _prepare(self, req: GenRequest) -> None:
        from vlmspec.runtime.audio.serve import prepare_audio

        if prepare_audio(self, req):  # an `input_audio` clip: its features and prompt (vlmspec.runtime.audio)
            return
        from vlmspec.runtime.serve.video import prepare_video

        if prepare_video(self, req):  # a `video_url` video: read whole here, so a bad one is a 400 (serve/video.py)
            return
        if req.image is not None and self.images is not None:
            req.pixels = self.images.get(req.image, self.stats, self.max_pixels)
        p = self.processor
        if req.pixels is None:
            req.ids = p.encode_chat(req.history, req.question, 0, system=req.system)
        else:  # a native-size image (Qwen2-VL) takes as many tokens as its size makes
            req.ids = p.encode_chat(req.history, req.question, 1, p.image_slot(req.pixels), system=req.system)

    # ------------------------------------------------------------ the decode thread
    def _serve_forever(self) -> None:
        """The decode thread: one iteration per decode step; it blocks only while nothing is running."""
        while not self.halt.is_set():
            self._collect(block=not self.batches)
            if self.halt.is_set():
                break
            arrivals = self._due()
            if arrivals or self.batches:
                try:
                    self.iterate(arrivals)
                except Exception as e:  # noqa: BLE001  (a bug, not a bad request: fail what runs, keep serving)
                    self._fail([row.req for b in self.batches for row in b.rows if not row.done], e)
                    self.batches = []
                    self._flush()

    def running(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    def _collect(self, block: bool) -> None:
        """Move arrivals from `incoming` to `held`. An idle engine (`block`) sleeps until a request comes,
        then until the first one held is due (see `_ready`); a running one only takes what is there."""
        while True:
            wait = None if block and not self._ready() else 0.0
            if wait is None and self.held:
                wait = max(self.held[0].queued + self.max_wait - time.perf_counter(), 0.0)
            try:
                req = self.incoming.get(timeout=wait) if wait != 0 else self.incoming.get_nowait()
            except queue.Empty:
                return
            if req is None:  # `stop`
                return
            self.held.append(req)

    def _ready(self) -> bool:
        """Whether the held arrivals should be prefilled now: they fill the batch, or the first has waited
        `max_wait` for company. A place may stay empty for a step or two rather than prefill each arrival
        on its own (see the module docstring)."""
        room = self.max_batch - self.running()
        if not self.held or room <= 0:
            return False
        return len(self.held) >= room or time.perf_counter() >= self.held[0].queued + self.max_wait

    def _due(self) -> list[GenRequest]:
        """The held arrivals to admit at this step (as many as fit), or none yet."""
        if not self._ready():
            return []
        room = self.max_batch - self.running()
        due, self.held = self.held[:room], self.held[room:]
        return due

    @torch.inference_mode()
    def iterate(self, arrivals: list[GenRequest]) -> None:
        """One decode step: admit `arrivals`, then one token for every running row; stream the deltas."""
        try:
            if arrivals:
                self._admit(arrivals)
            for batch in list(self.batches):
                self._step(batch)
            self._coalesce()
            self.stats.running = self.running()
        finally:
            self._flush()

    def _admit(self, reqs: list[GenRequest]) -> None:
        """Prefill the arrivals (rows with and without an image separately, and native-size images one
        size at a time: one forward cannot mix them) and merge each prefilled group into a running batch
        it is compatible with (after prefill, rows of any image size decode together)."""
        sized: dict[tuple[int, ...], list[GenRequest]] = {}
        for r in reqs:
            if r.pixels is not None:
                # native-size images one size at a time; anyres images one token count at a time
                key = (tuple(r.pixels.shape) if self.processor.native is not None
                       else (self.processor.image_tokens(r.pixels),) if self.processor.laid_out is not None else ())
                sized.setdefault(key, []).append(r)
        for group in (*sized.values(), [r for r in reqs if r.pixels is None]):
            if not group:
                continue
            try:
                self._place(self._prefill(group))
            except Exception as e:  # noqa: BLE001  (a bad prompt fails its own group, not the running rows)
                self._fail(group, e)

    def _place(self, new: Batch) -> None:
        """Merge a prefilled group into the running batch, or run it beside it while the two cannot merge."""
        target = next((b for b in self.batches if b.compatible(new)), None)
        if target is None:
            self.batches.append(new)
        else:
            self._merge(target, new)

    def _coalesce(self) -> None:
        """Merge batches that have become compatible (after a step, per-pass state is one token wide in
        both), so rows that could not join at their prefill decode in one forward from then on."""
        if len(self.batches) < 2:
            return
        merged: list[Batch] = []
        for batch in self.batches:
            target = next((m for m in merged if m.compatible(batch)), None)
            if target is None:
                merged.append(batch)
            else:
                self._merge(target, batch)
        self.batches = merged

    def _merge(self, target: Batch, other: Batch) -> None:
        width = max(target.mask.shape[1], other.mask.shape[1])
        target.merge(other, self._reserve(target.rows + other.rows, width))

    def _prefill(self, group: list[GenRequest]) -> Batch:
        """The arrivals' prompts in one forward, left-padded among themselves, into a batch of their own."""
        p = self.processor
        self.stats.batches += 1
        self.stats.batched_rows += len(group)
        input_ids, mask = p.left_pad([req.ids for req in group])
        from vlmspec.runtime.audio.serve import audio_features

        audio = audio_features(self, group)  # None unless the rows hold `input_audio` clips
        from vlmspec.runtime.serve.video import video_features

        audio = audio if audio is not None else video_features(self, group)  # or `video_url` videos (serve/video.py)
        pixels, facts = p.stack([req.pixels for req in group]) if group[0].pixels is not None and audio is None \
            else (None, None)
        rows = []
        for req in group:
            req.prompt_tokens = len(req.ids)
            rows.append(Row(req, torch.Generator().manual_seed(req.seed if req.seed is not None else 0)))
        cache = KVCache(reserve=self._reserve(rows, mask.shape[1]))
        instruction = p.instruction([req.question for req in group]) if pixels is not None else None
        dev = self.device
        input_ids, mask, pixels, instruction, extra = move((input_ids, mask, pixels, instruction,
                                                            p.image_kwargs(facts)), dev)
        out = self.model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, cache=cache, logits_to_keep=1,
                         instruction=instruction, image_features=audio, **extra)
        # the next-token logits are picked from on the CPU, where each row's sampling generator lives
        return Batch(rows, cache, mask, out.logits[:, -1].float().cpu())

    def _reserve(self, rows: list[Row], width: int) -> int:
        """Cache positions to allocate up front, so the batch's cache never grows by copying while it decodes."""
        cap = width + max(r.req.max_tokens - r.req.tokens for r in rows)
        return min(cap, self.max_positions) if self.max_positions else cap

    def _step(self, batch: Batch) -> None:
        """Pick every row's next token, retire the rows that finished, and run the batched forward for the rest."""
        try:
            tokens = self._pick(batch)
            for row, tok in zip(batch.rows, tokens, strict=True):
                row.done = self._take(row, tok)
            keep = [i for i, row in enumerate(batch.rows) if not row.done]
            if not keep:
                self.batches.remove(batch)
                return
            if len(keep) < len(batch.rows):
                batch.keep(keep, self._reserve([batch.rows[i] for i in keep], batch.mask.shape[1] + 1))
                tokens = [tokens[i] for i in keep]
            batch.mask = F.pad(batch.mask, (0, 1), value=1)
            out = self.model(input_ids=torch.tensor(tokens, device=batch.mask.device)[:, None],
                             attention_mask=batch.mask, cache=batch.cache, logits_to_keep=1)
            batch.logits = out.logits[:, -1].float().cpu()
            self.stats.steps += 1
            self.stats.step_rows += len(keep)
        except Exception as e:  # noqa: BLE001
            if batch in self.batches:
                self.batches.remove(batch)
            self._fail([row.req for row in batch.rows if not row.done], e)

    def _pick(self, batch: Batch) -> list[int]:
        """Every row's next token: greedy rows in one argmax, sampling rows each with its own generator
        (`sample_top_p`, generation's sampler, one row at a time)."""
        logits = batch.logits
        if self.banned is not None:
            logits[:, self.banned] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        for i, row in enumerate(batch.rows):
            if row.req.temperature > 0:
                tokens[i] = int(sample_top_p(logits[i : i + 1], row.req.temperature, row.req.top_p, row.gen)[0])
        return tokens

    def _take(self, row: Row, tok: int) -> bool:
        """Give `tok` to the row's request: stream its text, apply its stops. True when it has finished."""
        p = self.processor
        req = row.req
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if tok in self.stop_ids:
            req.finish_reason = "stop"
            self._finish(req)
            return True
        req.output_ids.append(tok)
        req.tokens += 1
        self.stats.tokens += 1
        if req.stream or req.stop:  # text is only needed as we go to stream or to stop; else once, at the end
            text = p.decode(req.output_ids)
            cut = _stop_at(text, req.stop)
            if cut is not None:
                text = text[:cut]
            delta = text[len(req.text):]
            req.text = text
            if delta and req.stream:
                self._emit(req, delta)
            if cut is not None:
                req.finish_reason = "stop"
                self._finish(req)
                return True
        # the context is full when the fed token would not fit any more: the row ends as if at max_tokens
        full = self.max_positions is not None and req.prompt_tokens + req.tokens > self.max_positions
        if req.tokens >= req.max_tokens or full:
            req.finish_reason = "length"
            self._finish(req)
            return True
        return False

    def _finish(self, req: GenRequest) -> None:
        if not (req.stream or req.stop):
            req.text = self.processor.decode(req.output_ids)
        self.stats.latency_sum += time.perf_counter() - req.enqueued
        if req.first_token is not None:
            self.stats.ttft_sum += req.first_token - req.enqueued
        self._emit(req, None)

    def _fail(self, reqs: list[GenRequest], e: Exception) -> None:
        for req in reqs:
            req.error = e
            self.stats.errors += 1
            self.stats.latency_sum += time.perf_counter() - req.enqueued
            self._emit(req, None)

    # ------------------------------------------------------------ streaming
    def _emit(self, req: GenRequest, delta: str | None) -> None:
        """Queue a text delta (None: the request is done) for delivery at the end of this step."""
        self._pending.append((req, delta))

    def _flush(self) -> None:
        """Hand one decode step's deltas to the event loop in one wake-up, not one per row."""
        pending, self._pending = self._pending, []
        if pending and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(_deliver, pending)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
                pass


def _deliver(pending: list[tuple[GenRequest, str | None]]) -> None:
    for req, delta in pending:
        req.deltas.put_nowait(delta)
        if delta is None:
            req.done.set()


def _stop_at(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

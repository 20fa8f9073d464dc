"""The serving engine: a bounded queue, dynamic batching of arrivals, a decode loop that streams.

Requests that arrive within `max_wait_ms` of each other are decoded together (one prefill, then one
batched forward per token, with the KV cache); each row stops on its own (eos, stop string,
max_tokens) and streams its text as it goes. Preprocessed images are cached by content hash, so the
same picture asked about twice is decoded once. A full queue refuses new work (the server answers
503) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmspec.runtime.images import open_image


class QueueFull(Exception):
    """The server is at capacity; the client should retry later (HTTP 503)."""


@dataclass(slots=True)
class GenRequest:
    question: str
    image: bytes | None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    # filled in by the engine
    ids: list[int] | None = None
    pixels: torch.Tensor | None = None
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "length"
    error: Exception | None = None
    enqueued: float = 0.0
    first_token: float | None = None
    done: asyncio.Event | None = None
    deltas: asyncio.Queue | None = None


@dataclass(slots=True)
class Stats:
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    tokens: int = 0
    batches: int = 0
    batched_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    latency_sum: float = 0.0
    ttft_sum: float = 0.0


class ImageCache:
    """LRU of preprocessed pixel tensors, keyed by the sha256 of the image bytes."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], capacity: int = 256):
        self.transform = transform
        self.capacity = capacity
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, data: bytes, stats: Stats, max_pixels: int) -> torch.Tensor:
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


class Engine:
    def __init__(self, model: Any, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64,
                 max_pixels: int = 16 * 1024 * 1024):
        self.model = model
        self.processor = model.processor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_pixels = max_pixels
        self.stats = Stats()
        self.queue: asyncio.Queue[GenRequest] | None = None
        self.task: asyncio.Task | None = None
        self.images = ImageCache(self.processor.transform) if self.processor.transform is not None else None
        self.lock = threading.Lock()  # one batch on the model at a time
        self._pending: list[tuple[GenRequest, str | None]] | None = None
        self.waiting = 0  # touched on the event loop only

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def depth(self) -> int:
        """Requests admitted and not yet decoding (being prepared, or waiting in the queue)."""
        return self.waiting

    async def submit(self, req: GenRequest) -> GenRequest:
        if self.queue is None:
            await self.start()
        if self.depth() >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull
        req.enqueued = time.perf_counter()
        self.stats.requests += 1
        self.waiting += 1
        try:
            # decode the image and tokenize the prompt off the model's thread, in parallel with decoding;
            # a bad image is then a 400 before the request ever waits in the queue
            await asyncio.to_thread(self._prepare, req)
        except Exception:
            self.waiting -= 1
            self.stats.errors += 1
            raise
        req.done = asyncio.Event()
        req.deltas = asyncio.Queue()
        await self.queue.put(req)
        return req

    def _prepare(self, req: GenRequest) -> None:
        if req.image is not None and self.images is not None:
            req.pixels = self.images.get(req.image, self.stats, self.max_pixels)
        req.ids = self.processor.encode_prompt(req.question, 1 if req.pixels is not None else 0)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            self.waiting -= 1
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                    self.waiting -= 1
                except TimeoutError:
                    break
            await asyncio.to_thread(self._run_batch, batch, loop)

    # ------------------------------------------------------------ decoding
    def _emit(self, loop: asyncio.AbstractEventLoop, req: GenRequest, delta: str | None) -> None:
        if self._pending is not None:  # inside a decode step: delivered together at the end of the step
            self._pending.append((req, delta))
            return
        loop.call_soon_threadsafe(_deliver, [(req, delta)])

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand one decode step's deltas to the event loop in one wake-up, not one per row."""
        pending, self._pending = self._pending, []
        if pending:
            loop.call_soon_threadsafe(_deliver, pending)

    def _finish(self, loop: asyncio.AbstractEventLoop, req: GenRequest) -> None:
        latency = time.perf_counter() - req.enqueued
        self.stats.latency_sum += latency
        if req.first_token is not None:
            self.stats.ttft_sum += req.first_token - req.enqueued
        self._emit(loop, req, None)

    def _run_batch(self, batch: list[GenRequest], loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            live = [(req, req.ids, req.pixels) for req in batch]
            self.stats.batches += 1
            self.stats.batched_rows += len(live)
            # rows with and without an image cannot share one batch; decode each group
            for group in (_group(live, with_image=True), _group(live, with_image=False)):
                if group:
                    try:
                        self._decode(group, loop)
                    except Exception as e:  # noqa: BLE001
                        for req, *_ in group:
                            req.error = e
                            self.stats.errors += 1
                            self._finish(loop, req)

    @torch.no_grad()
    def _decode(self, group: list[tuple[GenRequest, list[int], torch.Tensor | None]],
                loop: asyncio.AbstractEventLoop) -> None:
        from vlmspec.runtime.decoding import KVCache

        p = self.processor
        n = len(group)
        input_ids, mask = p.left_pad([ids for _, ids, _ in group])
        for req, ids, _ in group:
            req.prompt_tokens = len(ids)
        pixels = [px for _, _, px in group]
        pixel_values = p.tile(torch.stack(pixels)) if pixels[0] is not None else None
        gens = [torch.Generator().manual_seed(req.seed if req.seed is not None else 0) for req, _, _ in group]
        stop_ids = {p.eos_id} if p.eos_id is not None else set()
        generated: list[list[int]] = [[] for _ in group]
        active = [True] * n
        cache = KVCache()
        out = self.model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, cache=cache)
        logits = out.logits[:, -1]
        max_steps = max(req.max_tokens for req, _, _ in group)
        self._pending = []
        try:
            self._steps(group, loop, logits, out, cache, mask, gens, stop_ids, generated, active, max_steps)
        finally:
            self._flush(loop)
            self._pending = None

    def _steps(self, group, loop, logits, out, cache, mask, gens, stop_ids, generated, active, max_steps) -> None:
        p = self.processor
        n = len(group)
        for _step in range(max_steps):
            next_tokens = torch.full((n,), p.pad_id, dtype=torch.long)
            greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
            for i, (req, _, _) in enumerate(group):
                if not active[i]:
                    continue
                tok = greedy[i] if req.temperature <= 0 else _sample(logits[i], req.temperature, req.top_p, gens[i])
                next_tokens[i] = tok
                if req.first_token is None:
                    req.first_token = time.perf_counter()
                if tok in stop_ids:
                    req.finish_reason = "stop"
                    active[i] = False
                    if not req.stream:
                        req.text = p.decode(generated[i])
                    self._finish(loop, req)
                    continue
                generated[i].append(tok)
                req.tokens += 1
                self.stats.tokens += 1
                last = req.tokens >= req.max_tokens
                if req.stream or req.stop or last:  # text is only needed to stream, to stop, or at the end
                    text = p.decode(generated[i])
                    cut = _stop_at(text, req.stop)
                    if cut is not None:
                        text = text[:cut]
                        req.finish_reason = "stop"
                        active[i] = False
                    delta = text[len(req.text):]
                    req.text = text
                    if delta and req.stream:
                        self._emit(loop, req, delta)
                if active[i] and last:
                    req.finish_reason = "length"
                    active[i] = False
                if not active[i]:
                    self._finish(loop, req)
            self._flush(loop)
            if not any(active):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            out = self.model(input_ids=next_tokens[:, None], attention_mask=mask, cache=out.cache or cache)
            logits = out.logits[:, -1]
        for i, (req, _, _) in enumerate(group):
            if active[i]:
                self._finish(loop, req)


def _deliver(pending: list[tuple[GenRequest, str | None]]) -> None:
    for req, delta in pending:
        req.deltas.put_nowait(delta)
        if delta is None:
            req.done.set()


def _group(live, with_image: bool):
    return [x for x in live if (x[2] is not None) == with_image]


def _stop_at(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))

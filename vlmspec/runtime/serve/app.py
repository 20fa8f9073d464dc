"""`vlm serve`: an OpenAI-compatible HTTP API (Starlette under uvicorn) in front of the engine.

    POST /v1/chat/completions   messages (a system message, earlier user / assistant turns, the last user
                                message; `text`, `image_url` and `video_url` parts: data URLs, local
                                files under --files-root), max_tokens, temperature, top_p, stop, seed, stream (SSE)
    GET  /v1/models             the model this server runs
    GET  /health                liveness
    GET  /metrics               Prometheus text format (batches = prefills of arrivals; decode steps and
                                their rows give the mean size of the continuously running batch)

Malformed requests get a 4xx with an OpenAI-style `{"error": {...}}` object; a full queue gets 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from vlmspec.diagnostics import VlmSpecError
from vlmspec.runtime.grounding import message_boxes
from vlmspec.runtime.serve.engine import Engine, GenRequest, QueueFull

if TYPE_CHECKING:
    from vlmspec.runtime.session import Session


@dataclass(slots=True)
class ServeConfig:
    max_body: int = 20 * 1024 * 1024
    max_pixels: int = 16 * 1024 * 1024
    api_key: str | None = None
    files_root: str | None = None
    max_tokens_limit: int = 1024
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 64


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body is {int(declared):,} bytes, over the limit of {limit:,}", status=413,
                         code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body is over the limit of {limit:,} bytes", status=413, code="body_too_large")
    return bytes(body)


def _image_bytes(url: str, cfg: ServeConfig) -> bytes:
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head or not head.startswith("data:image/"):
            raise BadRequest("image_url data URLs must be `data:image/...;base64,...`", "messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image_url holds invalid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        raise BadRequest("this server does not fetch remote images; send the image as a data URL", "messages",
                         code="remote_image_unsupported")
    path = url.removeprefix("file://")
    if cfg.files_root is None:
        raise BadRequest("local image files are disabled; start the server with --files-root DIR", "messages")
    root = Path(cfg.files_root).resolve()
    target = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not target.is_relative_to(root):
        raise BadRequest(f"image path is outside the served folder {root}", "messages")
    if not target.is_file():
        raise BadRequest(f"image not found: {path}", "messages", code="image_not_found")
    return target.read_bytes()


def _content(message: dict[str, Any], cfg: ServeConfig) -> tuple[str, list[bytes]]:
    """A message's text parts (joined by newlines) and images."""
    content = message.get("content")
    texts: list[str] = []
    images: list[bytes] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest("image_url parts need `image_url.url`", "messages")
                images.append(_image_bytes(url, cfg))
            elif kind == "input_audio":  # a WAV clip, where an image would go (vlmspec.runtime.audio.serve)
                from vlmspec.runtime.audio.serve import audio_part

                try:
                    images.append(audio_part(part))
                except ValueError as e:
                    raise BadRequest(str(e), "messages") from None
            elif kind == "video_url":  # a video, where an image would go (vlmspec.runtime.serve.video)
                from vlmspec.runtime.serve.video import video_source

                url = part.get("video_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest("video_url parts need `video_url.url`", "messages")
                images.append(video_source(url, cfg.files_root, lambda m: BadRequest(m, "messages")))
            else:
                raise BadRequest(f"unsupported content part {kind!r}; use `text` and `image_url`", "messages")
    elif not (content is None and message.get("role") == "assistant"):
        raise BadRequest("message content must be a string or a list of parts", "messages")
    return "\n".join(texts), images


def _conversation(messages: list[Any], cfg: ServeConfig) -> tuple[str | None, list[tuple[str, str]], str, list[bytes]]:
    """(system text, earlier (question, answer) turns, the last question, the images): the whole
    conversation, laid out by the model's processor as its training conversations are. Refused rather
    than laid out differently: a conversation not ending with a user message, two user (or assistant)
    messages in a row, a system message after the first turn, an image outside the first user message."""
    system: str | None = None
    turns: list[tuple[str, str | None]] = []
    images: list[bytes] = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"message role {role!r}: use system, user and assistant", "messages")
        text, found = _content(m, cfg)
        if found and (role != "user" or turns):
            raise BadRequest("images go in the first user message (the model reads them before the first "
                             "question)", "messages")
        images += found
        if role in ("system", "developer"):
            if turns:
                raise BadRequest("a system message must come before the conversation", "messages")
            system = text if system is None else system + "\n" + text
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise BadRequest("two user messages in a row: join them, or put the assistant's reply between",
                                 "messages")
            turns.append((text, None))
        else:
            if not turns or turns[-1][1] is not None:
                raise BadRequest("an assistant message must answer a user message", "messages")
            turns[-1] = (turns[-1][0], text)
    if not turns:
        raise BadRequest("`messages` has no user message", "messages")
    if turns[-1][1] is not None:
        raise BadRequest("the last message must be the user's (the model answers it)", "messages")
    earlier = [(q, a) for q, a in turns[:-1] if a is not None]
    return system, earlier, turns[-1][0], images


def parse_chat(body: dict[str, Any], cfg: ServeConfig) -> tuple[GenRequest, bool]:
    """An OpenAI chat-completions body -> one generation request: the system message, the earlier turns,
    the last user turn and the image."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list", "messages")
    system, history, question, images = _conversation(messages, cfg)
    if len(images) > 1:
        raise BadRequest("one image per request is supported", "messages")

    def number(name: str, default: float, lo: float, hi: float) -> float:
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise BadRequest(f"`{name}` must be a number in [{lo}, {hi}]", name)
        return float(v)

    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise BadRequest(f"`max_tokens` must be an integer in [1, {cfg.max_tokens_limit}]", "max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("`stop` must be a string or up to 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("`seed` must be an integer", "seed")
    n = body.get("n", 1)
    if n is not None and n != 1:  # never fewer choices than asked for, silently
        raise BadRequest("`n` must be 1: one choice per request (send n requests, with seeds, for more)", "n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object", "stream_options")
    req = GenRequest(question=question, image=images[0] if images else None, system=system, history=history,
                     max_tokens=max_tokens,
                     temperature=number("temperature", 1.0, 0.0, 2.0), top_p=number("top_p", 1.0, 0.0, 1.0),
                     stop=stop, seed=seed)
    req.include_usage = bool((options or {}).get("include_usage", False))
    return req, bool(body.get("stream", False))


def create_app(session: Session, cfg: ServeConfig | None = None, name: str | None = None) -> Starlette:
    cfg = cfg or ServeConfig()
    engine = Engine(session, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue,
                    max_pixels=cfg.max_pixels)
    model_name = name or session.name
    started = time.time()

    def authorised(request: Request) -> bool:
        if cfg.api_key is None:
            return True
        return request.headers.get("authorization", "") == f"Bearer {cfg.api_key}"

    async def chat(request: Request) -> Response:
        if not authorised(request):
            return error(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        try:
            raw = await _read_body(request, cfg.max_body)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            req, stream = parse_chat(body, cfg)
            req.stream = stream
            try:
                req = await engine.submit(req)
            except QueueFull:
                return error(503, "the server is at capacity; retry later", "overloaded_error", code="queue_full")
            except VlmSpecError as e:  # a bad image or an over-long prompt, found before queueing
                return _engine_error(e)
        except BadRequest as e:
            return error(e.status, e.message, param=e.param, code=e.code)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(req, rid, created, model_name, lambda r: message_boxes(session, r.text, r.image)),
                                     media_type="text/event-stream")
        await req.done.wait()
        if req.error is not None:
            return _engine_error(req.error)
        message: dict[str, Any] = {"role": "assistant", "content": req.text}
        found = message_boxes(session, req.text, req.image)  # a grounding model: its boxes, in the image's pixels
        if found is not None:
            message["boxes"] = found
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": req.finish_reason}],
            "usage": _usage(req),
        })

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(started), "owned_by": "vlmspec"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "queue": engine.depth()})

    async def metrics(request: Request) -> Response:
        s = engine.stats
        lines = [
            "# TYPE vlmspec_requests_total counter", f"vlmspec_requests_total {s.requests}",
            "# TYPE vlmspec_request_errors_total counter", f"vlmspec_request_errors_total {s.errors}",
            "# TYPE vlmspec_requests_rejected_total counter", f"vlmspec_requests_rejected_total {s.rejected}",
            "# TYPE vlmspec_generated_tokens_total counter", f"vlmspec_generated_tokens_total {s.tokens}",
            "# TYPE vlmspec_batches_total counter", f"vlmspec_batches_total {s.batches}",
            "# TYPE vlmspec_batch_rows_total counter", f"vlmspec_batch_rows_total {s.batched_rows}",
            "# TYPE vlmspec_decode_steps_total counter", f"vlmspec_decode_steps_total {s.steps}",
            "# TYPE vlmspec_decode_step_rows_total counter", f"vlmspec_decode_step_rows_total {s.step_rows}",
            "# TYPE vlmspec_running_requests gauge", f"vlmspec_running_requests {s.running}",
            "# TYPE vlmspec_image_cache_hits_total counter", f"vlmspec_image_cache_hits_total {s.cache_hits}",
            "# TYPE vlmspec_image_cache_misses_total counter", f"vlmspec_image_cache_misses_total {s.cache_misses}",
            "# TYPE vlmspec_request_latency_seconds_sum counter", f"vlmspec_request_latency_seconds_sum {s.latency_sum:.6f}",
            "# TYPE vlmspec_time_to_first_token_seconds_sum counter",
            f"vlmspec_time_to_first_token_seconds_sum {s.ttft_sum:.6f}",
            "# TYPE vlmspec_queue_depth gauge", f"vlmspec_queue_depth {engine.depth()}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await engine.start()
        yield
        await engine.stop()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.engine = engine
    return app


def _engine_error(e: Exception) -> JSONResponse:
    if isinstance(e, VlmSpecError) and e.diagnostics:
        d = e.diagnostics[0]
        return error(400, d.message, code=d.code)
    return error(500, f"generation failed: {type(e).__name__}", "server_error")


async def _sse(req: GenRequest, rid: str, created: int, model: str,
               boxes_of: Callable[[GenRequest], list[dict] | None] = lambda r: None):
    """The chunks of a streamed completion. A grounding model's boxes (`boxes_of`) ride on the last chunk's
    delta, beside `finish_reason`: only the whole answer can be read for them."""
    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    # the envelope of a content chunk never changes: format it once, then only the delta is encoded
    head = ("data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]})
            ).split('"content": ""', 1)
    done = False
    while not done:
        events = []
        delta = await req.deltas.get()
        while True:  # everything already decoded goes out in one write
            if delta is None:
                done = True
                break
            events.append(head[0] + '"content": ' + json.dumps(delta) + head[1] + "\n\n")
            if req.deltas.empty():
                break
            delta = req.deltas.get_nowait()
        if events:
            yield "".join(events)
    if req.error is not None:
        yield "data: " + json.dumps({"error": {"message": str(req.error), "type": "server_error"}}) + "\n\n"
    else:
        found = boxes_of(req)
        yield chunk({} if found is None else {"boxes": found}, req.finish_reason)
        if req.include_usage:  # OpenAI's last chunk for `stream_options.include_usage`: no choices, the counts
            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [], "usage": _usage(req)}) + "\n\n"
    yield "data: [DONE]\n\n"


def _usage(req: GenRequest) -> dict[str, int]:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.tokens,
            "total_tokens": req.prompt_tokens + req.tokens}

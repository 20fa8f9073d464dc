"""A minimal client for OpenAI-compatible chat completions with one image or video, for `vlm eval --server`.

`httpx` is used when it is installed (connection reuse across thousands of requests); otherwise the
standard library's `urllib`, so evaluating a server needs no extra package. A server error or an answer
without text stops the run with a one-line `E0553` rather than scoring an empty prediction: a silently
failing server would otherwise look like a bad model. A 401/403 is `E0555` (the server wants an API key,
or refused the one given), with the way to pass one. The key travels only in the `Authorization` header:
it is never part of a message, a result or the client's `repr`.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlmspec.diagnostics import user_error


def chat_request(text: str, png: bytes, max_tokens: int, model: str | None) -> dict[str, Any]:
    """The request body: one user turn with the text and the image as a PNG data URL, greedy decoding."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {
        "model": model or "default",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                  {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def video_url(path: str | Path) -> str:
    """A video for a `video_url` part: a file inline as a data URL (any server reads it), a folder of frames as
    a `file://` URL, which the server reads only when allowed to (`vlm serve --files-root`, vLLM's
    `--allowed-local-media-path`)."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().as_uri()
    mime = mimetypes.guess_type(p.name)[0] or "video/mp4"
    if not mime.startswith("video/"):
        mime = "video/mp4"
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def video_request(text: str, url: str, max_tokens: int, model: str | None) -> dict[str, Any]:
    """One user turn with the video part first, then the text (vLLM's and `vlm serve`'s video layout)."""
    return {
        "model": model or "default",
        "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                  {"type": "text", "text": text}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _is_box(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), int | float) for k in ("x1", "y1", "x2", "y2"))


class ChatClient:
    """POSTs to `{url}/v1/chat/completions` and returns the answer text."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0, api_key: str | None = None):
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/v1/chat/completions") else base + "/v1/chat/completions"
        self.model = model
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.served_model: str | None = None
        try:
            import httpx
        except ImportError:
            self._httpx: Any = None
        else:
            self._httpx = httpx.Client(timeout=timeout)

    def complete(self, text: str, png: bytes, max_tokens: int) -> str:
        return self._answer(chat_request(text, png, max_tokens, self.model))

    def complete_video(self, text: str, video: str | Path, max_tokens: int) -> str:
        return self._answer(video_request(text, video_url(video), max_tokens, self.model))

    def complete_boxes(self, text: str, png: bytes, max_tokens: int) -> tuple[str, list[dict[str, Any]] | None]:
        """(answer, the message's `boxes`): `vlm serve` adds the boxes of a model whose spec declares `boxes`, in
        the sent image's pixels; None when the server sent no such field."""
        reply = self._post(chat_request(text, png, max_tokens, self.model))
        content = self._content(reply)
        boxes = reply["choices"][0]["message"].get("boxes")
        if boxes is not None and not (isinstance(boxes, list) and all(_is_box(b) for b in boxes)):
            raise user_error("E0553", f"{self.endpoint} answered with a `boxes` field that is not a list of "
                             f"{{x1, y1, x2, y2}} objects: {json.dumps(boxes)[:200]}")
        return content, boxes

    def _answer(self, body: dict[str, Any]) -> str:
        return self._content(self._post(body))

    def _content(self, reply: dict[str, Any]) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise user_error("E0553", f"{self.endpoint} answered without choices[0].message.content: "
                             f"{json.dumps(reply)[:200]}") from None
        if isinstance(content, list):   # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise user_error("E0553", f"{self.endpoint} answered with non-text content")
        if self.served_model is None and isinstance(reply.get("model"), str):
            self.served_model = reply["model"]
        return content.strip()

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = self._headers
        if self._httpx is not None:
            try:
                r = self._httpx.post(self.endpoint, content=data, headers=headers)
            except Exception as e:  # httpx's transport errors share no base class we can name without it
                raise user_error("E0553", f"cannot reach {self.endpoint}: {e}") from None
            self._check_auth(r.status_code)
            self._check_input(r.status_code, r.text)
            if r.status_code >= 400:
                raise user_error("E0553", f"{self.endpoint} answered HTTP {r.status_code}: {r.text[:200]}")
            return self._json(r.text)
        req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return self._json(resp.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as e:
            self._check_auth(e.code)
            detail = e.read().decode("utf-8", "replace")[:200]
            self._check_input(e.code, detail)
            raise user_error("E0553", f"{self.endpoint} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise user_error("E0553", f"cannot reach {self.endpoint}: {reason}",
                             help="is the server running? (`vlm serve DIR`)") from None

    def _check_auth(self, status: int) -> None:
        """401/403: the server wants a key or refused this one. Said in one line, without the key."""
        if status not in (401, 403):
            return
        if "Authorization" in self._headers:
            raise user_error("E0555", f"{self.endpoint} refused the API key (HTTP {status})",
                             help="check the key passed with --api-key or in OPENAI_API_KEY")
        raise user_error("E0555", f"{self.endpoint} needs an API key (HTTP {status})",
                         help="pass --api-key KEY, or set OPENAI_API_KEY")

    def _check_input(self, status: int, detail: str) -> None:
        """400: the server read the request and refused its input (a truncated video, an image it cannot
        open). Its own code, so that a runner can count the sample as a bad record instead of stopping."""
        if status == 400:
            raise user_error("E0544", f"{self.endpoint} refused the input (HTTP 400): {detail[:200]}")

    def __repr__(self) -> str:
        return f"ChatClient({self.endpoint!r}, model={self.model!r})"

    def _json(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise user_error("E0553", f"{self.endpoint} answered with invalid JSON: {text[:200]}") from None
        if not isinstance(value, dict):
            raise user_error("E0553", f"{self.endpoint} answered with JSON that is not an object")
        return value

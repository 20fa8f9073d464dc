"""A minimal LSP client over a subprocess's stdio, as an editor speaks it: JSON-RPC 2.0 messages framed
by a `Content-Length` header. Used by tests/lsp/test_lsp_stdio.py and bench/lsp_latency.py.

A reader thread parses every message the server writes into a queue; `request` waits for the response
with its id, keeping the notifications that arrive meanwhile (diagnostics) for `notification`.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def vlm_command() -> list[str]:
    """`vlm lsp` from the environment the tests run in (the venv's script, else `python -m vlmspec.cli`)."""
    script = Path(sys.executable).with_name("vlm")
    return [str(script), "lsp"] if script.exists() else [sys.executable, "-m", "vlmspec.cli", "lsp"]


def uri(path: str | Path) -> str:
    return Path(path).resolve().as_uri()


class LspClient:
    def __init__(self, cmd: list[str] | None = None, cwd: str | Path = ROOT, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(cmd or vlm_command(), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        self.messages: queue.Queue[dict | None] = queue.Queue()
        self.notifications: list[dict] = []
        self.stderr: list[bytes] = []
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    # ---------------------------------------------------------------- framing
    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            headers: dict[str, str] = {}
            while True:
                line = out.readline()
                if not line:
                    self.messages.put(None)
                    return
                line = line.strip()
                if not line:
                    break
                name, _, value = line.decode("ascii").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = out.read(int(headers["content-length"]))
            msg = json.loads(body)
            msg["_at"] = time.perf_counter()  # when it arrived, for latency measurements
            self.messages.put(msg)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, message: dict) -> float:
        """Write one message; returns the time it was written (perf_counter)."""
        body = json.dumps(message).encode("utf-8")
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()
        return time.perf_counter()

    # ---------------------------------------------------------------- JSON-RPC
    def notify(self, method: str, params: Any) -> float:
        return self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: Any, timeout: float = 20.0) -> Any:
        self.next_id += 1
        mid = self.next_id
        self.send({"jsonrpc": "2.0", "id": mid, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline, f"response to {method}")
            if msg.get("id") == mid and "method" not in msg:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result")
            self._keep(msg)

    def _keep(self, msg: dict) -> None:
        if "method" in msg and "id" in msg:  # a request from the server (e.g. registration): answer null
            self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
        elif "method" in msg:
            self.notifications.append(msg)

    def _next(self, deadline: float, what: str) -> dict:
        try:
            msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"no {what}; server stderr: {b''.join(self.stderr).decode(errors='replace')}") from None
        if msg is None:
            raise EOFError(f"server closed its output; stderr: {b''.join(self.stderr).decode(errors='replace')}")
        return msg

    def notification(self, method: str, match: dict | None = None, timeout: float = 20.0) -> dict:
        """The first kept (or next) notification `method` whose params include `match`; it is consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, n in enumerate(self.notifications):
                params = n.get("params") or {}
                if n["method"] == method and all(params.get(k) == v for k, v in (match or {}).items()):
                    return self.notifications.pop(i)
            self._keep(self._next(deadline, f"{method} {match}"))

    def diagnostics(self, doc_uri: str, version: int | None = None, timeout: float = 20.0) -> list[dict]:
        match: dict[str, Any] = {"uri": doc_uri}
        if version is not None:
            match["version"] = version
        return self.notification("textDocument/publishDiagnostics", match, timeout)["params"]["diagnostics"]

    # ---------------------------------------------------------------- the editor's side of a session
    def initialize(self, root: str | Path = ROOT) -> dict:
        result = self.request("initialize", {"processId": os.getpid(), "rootUri": uri(root), "capabilities": {
            "textDocument": {"hover": {"contentFormat": ["markdown", "plaintext"]},
                             "completion": {"completionItem": {"snippetSupport": False}},
                             "documentSymbol": {"hierarchicalDocumentSymbolSupport": True},
                             "publishDiagnostics": {"relatedInformation": True, "versionSupport": True}}}})
        self.notify("initialized", {})
        return result

    def open(self, doc_uri: str, text: str, version: int = 1) -> None:
        self.notify("textDocument/didOpen",
                    {"textDocument": {"uri": doc_uri, "languageId": "vlm", "version": version, "text": text}})

    def change(self, doc_uri: str, text: str, version: int) -> float:
        return self.notify("textDocument/didChange", {"textDocument": {"uri": doc_uri, "version": version},
                                                      "contentChanges": [{"text": text}]})

    def close_document(self, doc_uri: str) -> None:
        self.notify("textDocument/didClose", {"textDocument": {"uri": doc_uri}})

    def at(self, method: str, doc_uri: str, line: int, character: int, **extra: Any) -> Any:
        return self.request(method, {"textDocument": {"uri": doc_uri},
                                     "position": {"line": line, "character": character}, **extra})

    def shutdown(self, timeout: float = 10.0) -> int:
        """`shutdown` then `exit`, as an editor closes its server; returns the exit status."""
        self.request("shutdown", None)
        self.notify("exit", None)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

"""A small, real HTTP server on 127.0.0.1 that speaks the OpenAI chat API, for tests of OpenAI clients.

    with OpenAIStub(reply="1. Nairobi is the capital of Japan.", fail_first=2) as stub:
        client = OpenAI(base_url=stub.base_url, api_key="test")
        ...
        stub.requests  # every request received: method, path, headers (lower-case names), body (JSON)

Behaviour is controllable and may be changed while the server runs: `reply` (a string, or a callable
that gets the request body and returns the string), `fail_first` (that many initial chat requests get an
HTTP `fail_status`, 500 by default, with a short `retry-after-ms` so client retries are fast), and `delay`
(seconds to wait before answering, to provoke client timeouts). It serves `POST /v1/chat/completions`
and `GET /v1/models`; anything else is a 404 in OpenAI's error format.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in `delay` never blocks shutdown
    stub: OpenAIStub


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            self.close_connection = True

    def _record(self, body) -> int:
        headers = {key.lower(): value for key, value in self.headers.items()}  # HTTP names are case-blind
        return self.server.stub._record(self.command, self.path, headers, body)

    def do_GET(self):
        self._record(None)
        if self.path.rstrip("/") == "/v1/models":
            stub = self.server.stub
            self._send(200, {"object": "list", "data": [
                {"id": stub.model, "object": "model", "created": 0, "owned_by": "openai-stub"}]})
        else:
            self._send(404, _error(f"no route GET {self.path}", "not_found"))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._record(raw.decode(errors="replace"))
            self._send(400, _error("request body is not JSON", "invalid_request_error"))
            return
        number = self._record(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(f"no route POST {self.path}", "not_found"))
            return
        self.server.stub._answer(self, number, body)


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class OpenAIStub:
    """The server; start()/stop() or use it as a context manager. Thread-safe request log."""

    def __init__(self, reply: str | Callable[[dict], str] = "", *, fail_first: int = 0, fail_status: int = 500,
                 delay: float = 0.0, model: str = "stub-model", retry_after_ms: int | None = 10):
        self.reply = reply
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.model = model
        self.retry_after_ms = retry_after_ms
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._chat_calls = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> OpenAIStub:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in `delay`
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the stub is not running"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client (it appends /chat/completions etc.)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- what was received
    @property
    def chat_requests(self) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["method"] == "POST" and r["path"].startswith("/v1/chat")]

    def _record(self, method: str, path: str, headers: dict, body) -> int:
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
            if method == "POST":
                self._chat_calls += 1
            return self._chat_calls

    # -- answering
    def _answer(self, handler: _Handler, number: int, body: dict) -> None:
        if self.delay and self._stopping.wait(self.delay):
            return  # shutting down: drop the connection
        if number <= self.fail_first:
            headers = {"retry-after-ms": str(self.retry_after_ms)} if self.retry_after_ms is not None else {}
            handler._send(self.fail_status, _error(f"stub failure {number} of {self.fail_first}", "server_error"),
                          headers)
            return
        text = self.reply(body) if callable(self.reply) else self.reply
        handler._send(200, {
            "id": f"chatcmpl-stub-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })


@pytest.fixture
def openai_stub():
    """A running OpenAIStub (empty reply until a test sets `.reply`); stopped after the test."""
    with OpenAIStub() as stub:
        yield stub

"""A stdlib OpenAI-compatible chat-completions server on 127.0.0.1 for offline tests.

It plays scripted assistant turns: `reply(messages) -> Turn` picks the reply from the request
(stateless, e.g. by counting the assistant messages already in it). Streaming (SSE, with the
`include_usage` chunk) and plain JSON responses are both supported. Every request body is kept
in `requests` for assertions.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass(frozen=True)
class Turn:
    """One assistant message: optional text and tool calls `(name, raw arguments string)`."""

    content: str | None = None
    tool_calls: tuple[tuple[str, str], ...] = ()


Reply = Callable[[list[dict[str, Any]]], Turn]


def _message(turn: Turn, n: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if turn.tool_calls:
        msg["tool_calls"] = [
            {"id": f"call_{n}_{i}", "type": "function",
             "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(turn.tool_calls)
        ]
    return msg


class FakeOpenAI:
    """`with FakeOpenAI(reply) as server: ... server.base_url ...`"""

    def __init__(self, reply: Reply, model: str = "fake-model"):
        self.reply = reply
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    body = {"object": "list", "data": [{"id": fake.model, "object": "model"}]}
                    self._send(200, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": "not found"}', "application/json")
                    return
                body = json.loads(raw)
                with fake._lock:
                    fake.requests.append(body)
                    n = len(fake.requests)
                turn = fake.reply(body["messages"])
                msg = _message(turn, n)
                finish = "tool_calls" if turn.tool_calls else "stop"
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                base = {"id": f"chatcmpl-{n}", "created": 0, "model": body.get("model", "m")}
                if not body.get("stream"):
                    out = {**base, "object": "chat.completion", "usage": usage,
                           "choices": [{"index": 0, "message": msg, "finish_reason": finish}]}
                    self._send(200, json.dumps(out).encode(), "application/json")
                    return
                delta: dict[str, Any] = {"role": "assistant", "content": turn.content}
                if turn.tool_calls:
                    calls = msg["tool_calls"]
                    delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(calls)]
                chunks = [
                    {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                    {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                ]
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunks.append({**base, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage})
                sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self._send(200, sse.encode(), "text/event-stream")

        return Handler

"""A local OpenAI-compatible server for tests: judges, generators and served models
without a network. The test gives a function from the request body to the reply (text,
or a `StubReply` with an HTTP status, headers or a raw body), so replies can be canned,
derived from the request, or fail the first N times.

    with OpenAIStub(lambda body: "[[7]]") as server:
        client = ChatClient(server.base_url, "judge")

Serves POST /v1/chat/completions, POST /v1/completions (a "prompt") and GET /v1/models.
For 429 and 5xx replies pass a short `retry-after-ms` header so the client's backoff
stays fast.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class StubReply:
    text: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # a raw body instead of a completion (e.g. malformed JSON)
    prompt_tokens: int = 0  # 0: the number of words in the request
    completion_tokens: int = 0  # 0: the number of words in `text`


def _words_in(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


def _completion(body: dict, reply: StubReply, chat: bool) -> dict:
    prompt_tokens = reply.prompt_tokens or _words_in(body)
    completion_tokens = reply.completion_tokens or len(reply.text.split())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}}
    else:
        choice = {"index": 0, "text": reply.text}
    return {
        "id": "stub",
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": body.get("model", "stub"),
        "choices": [{**choice, "finish_reason": "stop", "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class OpenAIStub:
    def __init__(self, reply: Callable[[dict], str | StubReply]) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: str, headers: dict[str, str]) -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    models = {"object": "list", "data": [{"id": "stub", "object": "model"}]}
                    self._send(200, json.dumps(models), {})
                else:
                    self._send(404, json.dumps({"error": {"message": "not found"}}), {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                chat = self.path.endswith("/chat/completions")
                if not chat and not self.path.endswith("/completions"):
                    self._send(404, json.dumps({"error": {"message": "not found"}}), {})
                    return
                with stub._lock:
                    stub.requests.append(body)
                reply = stub.reply(body)
                reply = reply if isinstance(reply, StubReply) else StubReply(text=reply)
                if reply.body is not None:
                    self._send(reply.status, reply.body, reply.headers)
                elif reply.status != 200:
                    error = {"error": {"message": f"stub status {reply.status}", "type": "stub"}}
                    self._send(reply.status, json.dumps(error), reply.headers)
                else:
                    self._send(200, json.dumps(_completion(body, reply, chat)), reply.headers)

        return Handler

    def __enter__(self) -> OpenAIStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

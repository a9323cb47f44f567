"""An OpenAI-shaped server on 127.0.0.1 that fails the ways real ones do, for the LLM client's tests.

Run as (a server in a process of its own, to be killed; it prints its URL, GET /stats counts its requests):
    python -m pixelray.testing.llm_servers ok [--delay 0.2] [--port P]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FailingLLM(ThreadingHTTPServer):
    """An OpenAI-shaped server on 127.0.0.1 that fails on purpose, by `mode` (which may be changed
    while it runs): 500, 400 (a request refused), no_choices, invalid_json, slow; usage_not_object, choices_not_list,
    not_an_object (valid JSON of the wrong shape); huge (a JSON body of 9 MiB), huge_unsized (the same
without Content-Length: the body ends when the connection closes); retry_after (HTTP 429
    with `Retry-After: <retry_after>`); or ok: a chat completion whose text is `caption N` (the Nth
request), a server that is up again: asked to stream, it sends `caption`, ` N` and the usage as
    server-sent events, `delay` seconds apart, and notes when it sent the last (`stream_ended`, in
    time.monotonic()). `delay` also holds every plain answer. It counts the requests it gets (and GET
    /stats says how many); `port` 0 is any free one."""

    def __init__(self, mode: str, retry_after: str = "3600", port: int = 0, delay: float = 0.0):
        self.mode, self.requests, self.retry_after, self.lock = mode, 0, retry_after, threading.Lock()
        self.delay, self.stream_ended = delay, None
        super().__init__(("127.0.0.1", port), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, sized: bool = True, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: the point of "slow" and "huge"
            pass

    def do_GET(self):
        if self.path == "/stats":
            self._send(200, json.dumps({"requests": self.server.requests}).encode())
            return
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())

    def _stream(self, number: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "x", "object": "chat.completion.chunk", "model": "m"}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]}
                  for text in ("caption", f" {number}")]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}})
        try:
            for event in events:
                time.sleep(self.server.delay)
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.server.stream_ended = time.monotonic()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        with self.server.lock:  # (requests come in concurrently)
            self.server.requests += 1
            number = self.server.requests
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        mode = self.server.mode
        if mode == "ok" and isinstance(body, dict) and body.get("stream"):
            self._stream(number)
            return
        if mode == "slow":
            time.sleep(1.0)
        if self.server.delay:
            time.sleep(self.server.delay)
        if mode == "500":
            self._send(500, b'{"error": "model crashed"}')
        elif mode == "400":
            self._send(400, b'{"error": {"message": "this model takes no images", "type": "invalid_request"}}')
        elif mode == "no_choices":
            self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
        elif mode in ("usage_not_object", "choices_not_list"):
            answer = {"id": "x", "object": "chat.completion", "model": "m", "usage": {"prompt_tokens": 3},
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "a caption"}}]}
            answer.update({"usage": 7} if mode == "usage_not_object" else {"choices": {"0": answer["choices"][0]}})
            self._send(200, json.dumps(answer).encode())
        elif mode == "ok":
            self._send(200, json.dumps({
                "id": "x", "object": "chat.completion", "model": "m",
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"caption {number}"}}],
            }).encode())
        elif mode == "not_an_object":
            self._send(200, b'["a", "list"]')
        elif mode in ("huge", "huge_unsized"):
            self._send(200, json.dumps({"id": "x", "padding": "x" * (9 * 1024 * 1024)}).encode(),
                       sized=mode == "huge")
        elif mode == "retry_after":
            self._send(429, b'{"error": "slow down"}', Retry_After=self.server.retry_after)
        else:
            self._send(200, b"<html>not json</html>")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an OpenAI-shaped test server on 127.0.0.1")
    parser.add_argument("mode")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = FailingLLM(args.mode, port=args.port, delay=args.delay)
    print(server.url, flush=True)
    threading.Event().wait()

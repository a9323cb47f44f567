"""An OpenAI-shaped server on 127.0.0.1 that fails the ways real ones do, for the LLM client's tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FailingLLM(ThreadingHTTPServer):
    """An OpenAI-shaped server on 127.0.0.1 that fails on purpose: `mode` 500, no_choices,
    invalid_json or slow; it counts the requests it gets."""

    def __init__(self, mode: str):
        self.mode, self.requests = mode, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up waiting: that is the point of "slow"
            pass

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())

    def do_POST(self):
        self.server.requests += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.mode
        if mode == "slow":
            time.sleep(1.0)
        if mode == "500":
            self._send(500, b'{"error": "model crashed"}')
        elif mode == "no_choices":
            self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
        else:
            self._send(200, b"<html>not json</html>")

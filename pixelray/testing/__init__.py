"""What the tests and the benchmarks build on, importable from both (nothing here downloads anything):

- `tiny_encoders`, `tiny_vlms`, `tiny_mlx`: tiny random models built from configs and saved as the real
  ones are published, so pixelray loads them through its real loading code;
- `images`: good and bad image files, and realistic JPEG folders for benchmarks;
- `llm_servers`: an OpenAI-shaped server on 127.0.0.1 that fails the ways real ones do;
- `cluster`: a real two-node Ray cluster on 127.0.0.1, started with `ray start`;
- `prometheus`: a Ray node's metrics endpoint, scraped and summed as Prometheus would;
- `free_port()`: a free TCP port on 127.0.0.1; `wait_until(check, ...)`: poll until something is ready.
"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, retry_on: tuple[type[BaseException], ...] = (OSError, ValueError),
               every: float = 0.5):
    """`check()`'s first truthy result, polled every `every` s; an error of `retry_on` (not up yet, up but
    still starting) counts as not yet; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except retry_on:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

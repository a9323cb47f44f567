"""What the tests and the benchmarks build on, importable from both (nothing here downloads anything):

- `tiny_encoders`, `tiny_vlms`, `tiny_mlx`: tiny random models built from configs and saved as the real
  ones are published, so pixelray loads them through its real loading code;
- `images`: good and bad image files, and realistic JPEG folders for benchmarks;
- `llm_servers`: an OpenAI-shaped server on 127.0.0.1 that fails the ways real ones do;
- `cluster`: a real two-node Ray cluster on 127.0.0.1, started with `ray start`;
- `free_port()`: a free TCP port on 127.0.0.1.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

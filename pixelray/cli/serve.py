"""What `pixelray serve` adds to Serve's own `serve run`: the proxy's host and port as options, and a line with
the URL and an example request once the app answers.

    with serve_config(None, "pixelray.serve_apps.vlm:build_app", ["models=shapes-demo"], port=8001) as (path, url):
        announce_when_ready(url)             # a thread: prints "ready at URL" and a curl line once /health answers
        serve run PATH                       # (the Serve config written to `path`, with http_options set)
"""

from __future__ import annotations

import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pixelray.errors import PixelrayError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "images" / "000000.png"


@contextmanager
def serve_config(config: str | None, app: str, arguments: list[str], host: str | None = None,
                 port: int | None = None) -> Iterator[tuple[Path, str]]:
    """A Serve config file for `serve run`: `config` (a Serve config YAML) or one application, `app` with its
    key=value `arguments`; with the proxy's host and port set where given. Yields its path (a temporary file)
    and the URL clients use."""
    if config:
        try:
            settings = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PixelrayError(f"cannot read the Serve config {config}: {e}") from None
    else:
        pairs = [a.split("=", 1) for a in arguments]
        if bad := [a for a, pair in zip(arguments, pairs) if len(pair) != 2]:
            raise PixelrayError(f"app arguments are key=value, not {bad[0]!r}")
        settings = {"applications": [{"name": "vlm", "route_prefix": "/", "import_path": app, "args": dict(pairs)}]}
    http = settings.setdefault("http_options", {})
    http["host"] = host or http.get("host", DEFAULT_HOST)
    http["port"] = port or http.get("port", DEFAULT_PORT)
    shown = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
    with tempfile.TemporaryDirectory(prefix="pixelray-serve-") as folder:
        path = Path(folder) / "serve.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        yield path, f"http://{shown}:{http['port']}"


def announce_when_ready(url: str, timeout: float = 1800.0) -> threading.Thread:
    """Print the URL and an example request once GET /health answers (a daemon thread; silent on timeout)."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    ready = answer.status == 200
                if ready:
                    image = EXAMPLE_IMAGE if EXAMPLE_IMAGE.is_file() else "photo.jpg"
                    print(f"pixelray serve: ready at {url}  (Ctrl-C stops it)\n"
                          f"  try: curl -F image=@{image} {url}/caption\n"
                          f"       (add -H 'Authorization: Bearer KEY' when the app has an api_key; OpenAI "
                          f"clients: base_url {url}/v1)", flush=True)
                    return
            except OSError:  # (URLError, a refused connection, a timeout)
                pass
            time.sleep(1.0)

    thread = threading.Thread(target=watch, daemon=True, name="announce")
    thread.start()
    return thread

"""What hostile requests cost the Serve app: memory pinned by /chat images, and the ingress's other routes
while large images decode.

Run as:
    python benchmarks/hostile.py [--conversations 8] [--chat-side 5000] [--decode-side 7000] [--uploads 4]

The app (the bundled shapes-demo, default settings) runs on a local Ray instance with its proxy on
127.0.0.1. Two measurements, through real HTTP:
1. /chat memory: `--conversations` conversations, each opened with one solid-colour PNG of
   `--chat-side` px square (a few KB sent, side^2 x 3 bytes decoded); the ingress replica's resident
   memory (RSS) before, after half of them and after all: kept images grow it, transient ones do not.
2. decoding off the event loop: `--uploads` concurrent /caption uploads of a `--decode-side` px PNG
   (under the default 50 MP limit) while /health is asked every 10 ms; /health's latency (p50, max)
   against its latency at rest.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

APP = "hostile"


def solid_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def ingress_rss() -> int:
    """The ingress replica's resident memory (its process is titled ray::ServeReplica:APP:Ingress)."""
    import psutil

    title = f"ServeReplica:{APP}:Ingress"
    for proc in psutil.process_iter(["cmdline"]):
        if any(title in part for part in proc.info["cmdline"] or []):
            return proc.memory_info().rss
    raise RuntimeError(f"no process titled ray::{title}")


def health_latencies(url: str, until: threading.Event) -> list[float]:
    import requests

    out = []
    while not until.is_set():
        began = time.perf_counter()
        requests.get(f"{url}/health", timeout=120)
        out.append(time.perf_counter() - began)
        time.sleep(0.01)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--chat-side", type=int, default=5000)
    p.add_argument("--decode-side", type=int, default=7000)
    p.add_argument("--uploads", type=int, default=4)
    args = p.parse_args()

    import ray
    import requests
    from ray import serve

    from pixelray.serve_apps.vlm import build_app
    from pixelray.testing import free_port

    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"name": "shapes-demo", "device": "cpu", "num_cpus": 0.5}]}), name=APP,
              route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        png = solid_png(args.chat_side)
        turn = {"message": "Describe the image.", "image_base64": "data:image/png;base64," +
                base64.b64encode(png).decode()}
        requests.post(f"{url}/chat", json=turn, timeout=300).raise_for_status()  # warm up the route
        rss, statuses = [ingress_rss()], []
        for half in (args.conversations // 2, args.conversations - args.conversations // 2):
            statuses += [requests.post(f"{url}/chat", json=turn, timeout=300).status_code for _ in range(half)]
            rss.append(ingress_rss())
        decoded = args.chat_side ** 2 * 3
        print(f"/chat: {args.conversations} conversations, each one {args.chat_side}x{args.chat_side} PNG "
              f"({len(png):,} bytes sent, {decoded / 2**20:.0f} MiB decoded); statuses {sorted(set(statuses))}")
        print(f"  ingress RSS before, after half, after all: {' -> '.join(f'{r / 2**20:.0f}' for r in rss)} MiB")

        rest_stop = threading.Event()
        threading.Timer(2.0, rest_stop.set).start()
        rest = health_latencies(url, rest_stop)
        big = solid_png(args.decode_side)
        busy_stop = threading.Event()
        result: dict = {}
        watcher = threading.Thread(target=lambda: result.update(lat=health_latencies(url, busy_stop)))
        watcher.start()

        def upload(_) -> int:
            return requests.post(f"{url}/caption", files={"image": ("big.png", big, "image/png")},
                                 timeout=600).status_code

        from concurrent.futures import ThreadPoolExecutor

        began = time.perf_counter()
        with ThreadPoolExecutor(args.uploads) as pool:
            codes = list(pool.map(upload, range(args.uploads)))
        took = time.perf_counter() - began
        busy_stop.set()
        watcher.join()
        busy = result["lat"]
        print(f"decoding: {args.uploads} concurrent /caption uploads of a {args.decode_side}x{args.decode_side} PNG "
              f"({len(big):,} bytes), statuses {sorted(set(codes))}, {took:.1f} s")
        print(f"  /health at rest: p50 {statistics.median(rest) * 1e3:.0f} ms, max {max(rest) * 1e3:.0f} ms; "
              f"meanwhile: p50 {statistics.median(busy) * 1e3:.0f} ms, max {max(busy) * 1e3:.0f} ms "
              f"({len(busy)} requests)")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

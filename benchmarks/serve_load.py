"""Load on the Serve app: requests/s and latency with `@serve.batch` on and off, then autoscaling.

Run as:
    python benchmarks/serve_load.py [--model random-llava] [--clients 16] [--seconds 30] [--max-tokens 64]

The default model is a LLaVA-architecture model of random weights (width 512, 6 layers, 56 px
images -> 16 image tokens), built and saved to a temp folder and served through the real loading
path: big enough that the model, not the HTTP path, is the bottleneck on a small CPU machine (the
bundled shapes-demo is so small that the proxy and ingress are; `--model shapes-demo` measures
that), with short prompts so that decoding, which is what batching speeds up, dominates as it does
in LLM serving. Random weights rarely stop early, so replies are about --max-tokens long.
The app runs on a local Ray instance with its proxy on 127.0.0.1; `--clients` concurrent clients
(asyncio + aiohttp, one process) post the example shapes images to /caption in a loop for
`--seconds`, and every response is counted (status codes, latency percentiles).
1. batching off (max_batch_size 1) and on (max_batch_size --batch-size), one replica each;
2. autoscaling: 1 to --max-replicas replicas (target_ongoing_requests --target), the replica count
   sampled every second under load and then while idle, until it is back at one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from pixelray.testing import free_port
from pixelray.testing.prometheus import metrics_port, scrape

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

IMAGES = sorted((ROOT / "examples" / "shapes" / "images").glob("*.png"))
APP = "bench"


async def drive(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` loops posting /caption until the deadline; latencies of the 200s, counts of the rest."""
    import aiohttp

    images = [p.read_bytes() for p in IMAGES]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = i
        while time.monotonic() < deadline:
            form = aiohttp.FormData()
            form.add_field("image", images[n % len(images)], filename="image.png", content_type="image/png")
            form.add_field("max_new_tokens", str(max_tokens))
            started = time.monotonic()
            try:
                async with session.post(f"{url}/caption", data=form) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        latencies.append(time.monotonic() - started)
            except aiohttp.ClientError:
                statuses[-1] = statuses.get(-1, 0) + 1  # connection-level failure
            n += clients

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"ok": len(latencies), "rps": len(latencies) / elapsed, "p50": q[49], "p95": q[94], "p99": q[98],
            "errors": sum(n for s, n in statuses.items() if s != 200),
            "5xx": sum(n for s, n in statuses.items() if s >= 500), "statuses": statuses}


def deploy(model: dict) -> None:
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    serve.run(build_app({"models": [model]}), name=APP, route_prefix="/", blocking=False)


def replicas(model_name: str) -> int:
    from ray import serve

    from pixelray.serve_apps.vlm import deployment_name

    states = serve.status().applications[APP].deployments[deployment_name(model_name)].replica_states
    return states.get("RUNNING", 0)


def row(label: str, r: dict) -> str:
    return (f"{label:28s} {r['rps']:8.2f} {r['p50'] * 1000:8.0f} {r['p95'] * 1000:8.0f} {r['p99'] * 1000:8.0f} "
            f"{r['ok']:6d} {r['errors']:6d} {r['5xx']:5d}")


def series(before: list, after: list, model: str, seconds: float) -> str:
    """What Ray's metrics endpoint says of the run (pixelray.telemetry's series, as Prometheus scrapes them)."""
    from pixelray.testing.prometheus import buckets, quantile, since, total

    run = since(before, after)

    def q(name: str, p: float) -> float:
        return quantile(buckets(run, name, model=model), p)

    ttft, latency = "ray_pixelray_serve_ttft_seconds", "ray_pixelray_serve_request_seconds"
    return (f"{'':28s} scraped: {total(run, 'ray_pixelray_serve_requests_total', model=model, status='200'):.0f} "
            f"requests, TTFT p50/p95 {q(ttft, 0.5) * 1000:.0f}/{q(ttft, 0.95) * 1000:.0f} ms, latency p50 "
            f"{q(latency, 0.5) * 1000:.0f} ms, batch size p50/p90 {q('ray_pixelray_serve_batch_size', 0.5):.1f}/"
            f"{q('ray_pixelray_serve_batch_size', 0.9):.1f}, "
            f"{total(run, 'ray_pixelray_serve_tokens_total', model=model, kind='generated') / seconds:.0f} tokens/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-llava", help="random-llava, or a registry name or folder")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--target", type=float, default=4, help="target_ongoing_requests per replica")
    p.add_argument("--skip-autoscaling", action="store_true")
    args = p.parse_args()

    import ray
    from ray import serve

    source = args.model
    if args.model == "random-llava":
        from pixelray.testing.tiny_vlms import save_tiny_llava

        source = str(save_tiny_llava(Path(tempfile.mkdtemp()) / "model", width=512, layers=6, image_size=56, patch=14))
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    base = {"name": args.model, "source": source, "device": "cpu", "num_cpus": args.num_cpus,
            "max_ongoing_requests": 64, "max_new_tokens": 512}
    print(f"{args.clients} clients, {args.seconds:.0f} s each, /caption with max_new_tokens={args.max_tokens}, "
          f"model {args.model}, {args.num_cpus} CPU per replica, on {os.cpu_count()} cores")
    print(f"{'':28s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'ok':>6s} {'errors':>6s} {'5xx':>5s}")
    results = {}
    settings = (("batching off (batch 1)", 1), (f"batching on (max batch {args.batch_size})", args.batch_size))
    for label, batch in settings:
        deploy({**base, "max_batch_size": batch, "min_replicas": 1, "max_replicas": 1})
        asyncio.run(drive(url, args.clients, 3, args.max_tokens))  # warm-up
        time.sleep(2)  # its series reach the endpoint (RAY_metrics_report_interval_ms, 1 s here)
        before = scrape(metrics_port())
        results[label] = asyncio.run(drive(url, args.clients, args.seconds, args.max_tokens))
        print(row(label, results[label]), flush=True)
        time.sleep(3)
        print(series(before, scrape(metrics_port()), args.model, args.seconds), flush=True)
    off, on = results.values()
    print(f"batching speed-up: {on['rps'] / off['rps']:.2f}x requests/s")

    if not args.skip_autoscaling:
        deploy({**base, "max_batch_size": args.batch_size, "min_replicas": 1, "max_replicas": args.max_replicas,
                "target_ongoing_requests": args.target, "upscale_delay_s": 2, "downscale_delay_s": 10})
        timeline: list[tuple[float, int]] = []
        t0 = time.monotonic()

        async def load_and_watch() -> dict:
            async def watch() -> None:
                while time.monotonic() - t0 < args.seconds:
                    timeline.append((time.monotonic() - t0, replicas(args.model)))
                    await asyncio.sleep(1)
            result, _ = await asyncio.gather(drive(url, args.clients, args.seconds, args.max_tokens), watch())
            return result

        loaded = asyncio.run(load_and_watch())
        print(row(f"autoscaling 1-{args.max_replicas} replicas", loaded))
        while time.monotonic() - t0 < args.seconds + 120:
            timeline.append((time.monotonic() - t0, replicas(args.model)))
            if timeline[-1][1] == 1 and max(n for _, n in timeline) > 1:
                break
            time.sleep(1)
        changes = [(t, n) for i, (t, n) in enumerate(timeline) if i == 0 or n != timeline[i - 1][1]]
        print("replicas over time (load until "
              f"{args.seconds:.0f} s, then idle): " + ", ".join(f"{t:.0f} s: {n}" for t, n in changes))
        peak = max(n for _, n in timeline)
        print(f"autoscaling: peak {peak} replicas under load, {timeline[-1][1]} when idle")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

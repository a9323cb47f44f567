"""A caption job whose model is remote (`remote:MODEL?url=...`), against `pixelray serve` on loopback: images/s
and how full the server's batches run, at 1, 8 and 32 requests in flight, beside the server's own saturated
throughput measured in the same run with the serve load benchmark's client.

Run as:
    python benchmarks/remote.py [--in-flight 1,8,32] [--seconds 30] [--max-tokens 64] [--batch-size 16]

The served model is serve_load.py's: a LLaVA-architecture model of random weights (width 512, 6 layers, 56 px
images), big enough that the model, not the HTTP path, is the bottleneck; one replica, `@serve.batch` up to
--batch-size. Random weights rarely stop early, so replies are about --max-tokens long.
1. saturated: serve_load's client, --batch-size x 2 concurrent clients posting /caption for --seconds;
2. for each in-flight count K: `pixelray caption` of about K x 8 example images (copies of examples/shapes,
   at least 24) with `remote:...&max_in_flight=K` and one generator actor; images/s over the whole job
   (its start-up included), and the mean batch the replica generated during it over --batch-size.
Everything (Ray, the server, the job) shares this machine's cores: on a small machine the job's own work
(decoding, PNG encoding, HTTP) takes time from the model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_load import APP, IMAGES, deploy, drive  # noqa: E402  (the serve load benchmark's client and app)

from pixelray.testing import free_port  # noqa: E402


def images(folder: Path, n: int) -> Path:
    """`n` copies of the example images under distinct names (distinct image_ids)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copyfile(IMAGES[i % len(IMAGES)], folder / f"{i:05d}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in-flight", default="1,8,32", help="requests in flight of the job, comma-separated")
    p.add_argument("--seconds", type=float, default=30, help="of the saturated measurement")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs of the model replica")
    args = p.parse_args()

    import ray
    from ray import serve

    from pixelray.pipelines.caption import CaptionConfig, run_caption
    from pixelray.serve_apps.vlm import deployment_name
    from pixelray.testing.tiny_vlms import save_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="pixelray-remote-bench-"))
    source = str(save_tiny_llava(work / "model", width=512, layers=6, image_size=56, patch=14))
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    deploy({"name": "llava", "source": source, "device": "cpu", "num_cpus": args.num_cpus, "max_ongoing_requests": 64,
            "max_new_tokens": 512, "max_batch_size": args.batch_size, "min_replicas": 1, "max_replicas": 1})
    while (status := serve.status().applications.get(APP)) is None or status.status != "RUNNING":
        time.sleep(0.5)
    handle = serve.get_deployment_handle(deployment_name("llava"), app_name=APP)
    print(f"model: random LLaVA (width 512, 6 layers), max_new_tokens={args.max_tokens}, max batch {args.batch_size}, "
          f"{args.num_cpus} CPU per replica, {os.cpu_count()} cores")

    clients = 2 * args.batch_size
    asyncio.run(drive(url, clients, 3, args.max_tokens))  # warm-up
    before = handle.stats.remote().result()
    saturated = asyncio.run(drive(url, clients, args.seconds, args.max_tokens))
    after = handle.stats.remote().result()
    fill = (after["batched_requests"] - before["batched_requests"]) / max(1, after["batches"] - before["batches"])
    print(f"server saturated ({clients} clients, /caption): {saturated['rps']:.2f} requests/s, "
          f"mean batch {fill:.1f} of {args.batch_size}, {saturated['errors']} errors")

    print(f"{'in flight':>9s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'x saturated':>12s} "
          f"{'mean batch':>11s} {'fill':>6s} {'errors':>7s}")
    for k in (int(x) for x in args.in_flight.split(",")):
        folder = images(work / f"images-{k}", max(24, 8 * k))
        before = handle.stats.remote().result()
        summary = run_caption(CaptionConfig(
            input=str(folder), out=str(work / f"out-{k}"), num_generators=1,
            model=f"remote:llava?url={url}/v1&max_in_flight={k}", generation={"max_new_tokens": args.max_tokens}))
        after = handle.stats.remote().result()
        mean = (after["batched_requests"] - before["batched_requests"]) / max(1, after["batches"] - before["batches"])
        rate = summary.written / summary.seconds
        print(f"{k:9d} {summary.written:7d} {summary.seconds:8.1f} {rate:9.2f} {rate / saturated['rps']:12.2f} "
              f"{mean:11.1f} {mean / args.batch_size:6.0%} {summary.errors:7d}", flush=True)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

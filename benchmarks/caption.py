"""Captioning throughput: batched generation inside `pixelray caption` vs one image at a time.

Run as:
    python benchmarks/caption.py [--num-images 64] [--batch-size 8] [--max-tokens 32]

Same images, same model: a LLaVA-architecture model with random weights (width 512, 6 layers,
224 px images -> 256 image tokens), saved to a folder and loaded through the real loading path.
1. one at a time: a plain loop calling the generator on one image per call;
2. batched, in process: the same generator on batches of --batch-size (the batching gain alone);
3. pixelray caption: the Ray Data job with generator actors and the same batch size, timed from job
   submission to the last file written (worker start-up and model loading included); it also runs
   on half of the images, and the difference of the two runs gives the steady-state rate (a small
   warm-up job runs first, so that neither pays for Ray Data's one-off start of its helpers).
Each prints images/s and generated tokens/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from pixelray.generators import GenerationConfig, create_generator
from pixelray.testing.images import make_images
from pixelray.testing.tiny_vlms import save_tiny_llava

PROMPT = "Describe the image."


def loop(gen, images: list[Image.Image], cfg: GenerationConfig, batch: int) -> tuple[float, float]:
    gen.generate(images[:batch], PROMPT, cfg)  # warm-up
    tokens, began = 0, time.perf_counter()
    for i in range(0, len(images), batch):
        tokens += sum(r.num_tokens for r in gen.generate(images[i:i + batch], PROMPT, cfg))
    seconds = time.perf_counter() - began
    return len(images) / seconds, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    import ray

    from pixelray.pipelines.caption import CaptionConfig, run_caption

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_images(work / "images", args.num_images)
        model = save_tiny_llava(work / "model", width=512, layers=6, image_size=224, patch=14)
        cfg = GenerationConfig(max_new_tokens=args.max_tokens)
        gen = create_generator(str(model), device="auto")
        params = sum(p.numel() for p in gen.model.parameters()) / 1e6
        print(f"{len(paths)} images, LLaVA-architecture model {params:.1f}M parameters (random), "
              f"max {args.max_tokens} new tokens, {os.cpu_count()} CPUs, device {gen.device}, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        images = [Image.open(p).convert("RGB") for p in paths]

        single = loop(gen, images, cfg, 1)
        print(f"one at a time:          {single[0]:7.2f} images/s {single[1]:8.1f} tokens/s", flush=True)
        batched = loop(gen, images, cfg, args.batch_size)
        print(f"batched {args.batch_size:2d}, in process: {batched[0]:7.2f} images/s {batched[1]:8.1f} tokens/s",
              flush=True)
        del gen

        ray.init(log_to_driver=False)

        def caption(images_dir: Path, out: str):
            summary = run_caption(CaptionConfig(input=str(images_dir), out=str(work / out), model=str(model),
                                                generation={"max_new_tokens": args.max_tokens},
                                                batch_size=args.batch_size))
            return summary, pq.read_table(work / out / "captions")["num_tokens"].to_numpy().sum()

        for name, subset in (("warm", paths[:8]), ("half", paths[: len(paths) // 2])):
            (work / name).mkdir()
            for p in subset:
                (work / name / p.name).symlink_to(p)
        caption(work / "warm", "captions-warm")  # Ray Data's first job starts its own helpers: not counted
        half, half_tokens = caption(work / "half", "captions-half")
        full, tokens = caption(work / "images", "captions")
        ray.shutdown()
        print(full)
        seconds = full.seconds - half.seconds
        steady = ((full.written - half.written) / seconds, (tokens - half_tokens) / seconds)
        print(f"pixelray caption, end to end: {full.images_per_s:7.2f} images/s {tokens / full.seconds:8.1f} "
              f"tokens/s  ({full.seconds:.1f} s)")
        print(f"pixelray caption, steady:     {steady[0]:7.2f} images/s {steady[1]:8.1f} tokens/s")
        print(f"batching gain over one at a time: in process {batched[0] / single[0]:.2f}x, pixelray caption "
              f"end to end {full.images_per_s / single[0]:.2f}x, steady {steady[0] / single[0]:.2f}x "
              f"(target >= 2x at batch 8)")

if __name__ == "__main__":
    main()

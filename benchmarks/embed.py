"""Embedding throughput: model-bound limit vs a naive loop vs `pixelray embed`, same images, same model.

Run as:
    python benchmarks/embed.py [--num-images 2000] [--batch-size 32] [--device auto]

1. model-bound: the encoder's forward alone over tensors decoded and preprocessed beforehand;
2. naive loop: one process, batch by batch: PIL decode, preprocess, forward;
3. pixelray embed: the Ray Data job (CPU decode tasks -> encoder actor pool -> Parquet), timed from
   job submission to the last file written, so worker start-up and model loading are included;
   it also runs on the first half of the images, and the difference of the two runs gives the
   steady-state rate with the fixed start-up cost taken out. A small warm-up job runs first, so that
   neither run pays for Ray Data's one-off start of its own helper actors.
The model is open_clip ViT-B-32 with random weights, saved to a folder and loaded by pixelray
through the same `local-dir:` path a downloaded model takes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from pixelray.encoders import create_encoder
from pixelray.testing.images import make_images


def save_random_vit_b_32(folder: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                              "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def model_bound(encoder, paths: list[Path], batch_size: int) -> float:
    pixels = torch.cat([encoder.preprocess([Image.open(p).convert("RGB") for p in paths[i:i + batch_size]])
                        for i in range(0, len(paths), batch_size)])
    encoder.encode(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        out = encoder.encode(pixels[i:i + batch_size])
        out.embedding.cpu()
    _sync(encoder)
    return len(paths) / (time.perf_counter() - start)


def naive_loop(encoder, paths: list[Path], batch_size: int) -> float:
    encoder.encode(encoder.preprocess([Image.open(paths[0]).convert("RGB")]))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + batch_size]]
        encoder.encode(encoder.preprocess(images)).embedding.cpu()
    _sync(encoder)
    return len(paths) / (time.perf_counter() - start)


def _sync(encoder) -> None:
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()


def pixelray_embed(model_dir: Path, images: Path | list[Path], out: Path, batch_size: int, device: str):
    from pixelray.pipelines.embed import EmbedConfig, run_embed

    if isinstance(images, list):  # a list file: one path per line
        listing = out.parent / f"{out.name}.txt"
        listing.write_text("\n".join(map(str, images)))
        images = listing
    return run_embed(EmbedConfig(input=str(images), out=str(out), encoder=str(model_dir),
                                 batch_size=batch_size, device=device, overwrite=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", default=None, help="keep images and outputs here (default: a temp dir)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t = time.perf_counter()
        paths = sorted((work / "images").glob("*.jpg"))
        if len(paths) != args.num_images:
            paths = make_images(work / "images", args.num_images)
        model_dir = save_random_vit_b_32(work / "vit-b-32-random")
        print(f"{len(paths)} images 224x224 JPEG, model open_clip ViT-B-32 (random weights), "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"set-up {time.perf_counter() - t:.0f} s", flush=True)

        encoder = create_encoder(str(model_dir), device=args.device)
        print(f"device {encoder.device}, torch threads {torch.get_num_threads()}", flush=True)
        bound = model_bound(encoder, paths, args.batch_size)
        print(f"model-bound (forward only): {bound:8.1f} images/s", flush=True)
        naive = naive_loop(encoder, paths, args.batch_size)
        print(f"naive loop:                 {naive:8.1f} images/s", flush=True)
        del encoder

        ray.init(log_to_driver=False)
        pixelray_embed(model_dir, paths[:64], work / "store-warm", args.batch_size, args.device)  # not counted
        half = pixelray_embed(model_dir, paths[: len(paths) // 2], work / "store-half", args.batch_size,
                              args.device)
        full = pixelray_embed(model_dir, work / "images", work / "store", args.batch_size, args.device)
        ray.shutdown()
        print(full)
        ours = full.images_per_s
        steady = (full.written - half.written) / (full.seconds - half.seconds)
        fixed = full.seconds - full.written / steady
        print(f"pixelray embed, end to end: {ours:8.1f} images/s  ({full.seconds:.1f} s)")
        print(f"pixelray embed, steady:     {steady:8.1f} images/s  (start-up cost {fixed:.1f} s)")
        print(f"ratios: end to end / model-bound = {ours / bound:.2f}, steady / model-bound = {steady / bound:.2f}"
              f"  (target >= 0.70)")
        print(f"        end to end / naive = {ours / naive:.2f}, steady / naive = {steady / naive:.2f}"
              f"  (target > 1)")


if __name__ == "__main__":
    main()

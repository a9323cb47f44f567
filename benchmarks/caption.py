"""Captioning throughput by engine: transformers one image at a time, transformers in static batches, and vLLM
(continuous batching), on the same model and images, then `pixelray caption` end to end with each engine.

Run as:
    python benchmarks/caption.py                                  # CPU: a small Qwen2-VL, 64 images
    python benchmarks/caption.py --preset qwen2-vl-2b --num-images 1024 --batch-size 32 --job-images 0   # a GPU

The model is a Qwen2-VL with random weights (vLLM and transformers both serve that architecture), built from
a config, saved to a folder and loaded through each engine's real loading code: `small` (width 512, 4 layers,
heads of 64) for CPUs, or `qwen2-vl-2b` (Qwen2-VL-2B's text and vision sizes, bf16; the tests' small vocabulary)
for a GPU. Images are 224 px (64 image
tokens each at the processor's max_pixels).

Replies vary in length as real captions do: the end-of-sequence row of the output layer is aimed along the
model's mean hidden state, scaled so that sampled replies to calibration prompts average EOS_EVERY tokens
(the benchmark's own replies average about 40); replies are sampled (temperature 1) and capped at
--max-tokens. That is where continuous batching differs from static batches, which run until their longest
reply ends.

1. hf, one at a time: the hf backend on one image per call;
2. hf, batched: the hf backend on batches of --batch-size (the project's batch jobs before vLLM);
3. vllm: the vllm backend on all images in one call (as a batch job's actor hands it a whole block);
4. `pixelray caption` with each engine, end to end (Ray start, actors, model load included), on --job-images.
Each prints images/s, generated tokens/s and the mean reply length (the engines sample differently, so their
lengths are compared too).
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
from pixelray.testing.tiny_vlms import save_tiny_qwen2_vl

PROMPT = "Describe the image."
EOS_EVERY = 24  # the mean reply length aimed at, on calibration prompts (the benchmark's own come out longer)
PRESETS = {  # text: hidden, layers, heads, kv heads, MLP; vision: width, depth, heads
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, mlp=1024, vision=(128, 2, 2), dtype="fp32"),
    "qwen2-vl-2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, mlp=8960, vision=(1280, 32, 16),
                        dtype="bf16"),
}


def save_model(out: Path, preset: dict) -> Path:
    """A random Qwen2-VL of the preset's sizes (the tests' tokenizer, 224 px images -> 64 image tokens), its
    replies' lengths set by aim_end_of_sequence, saved as transformers saves one."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    folder = save_tiny_qwen2_vl(out, hidden=preset["hidden"], layers=preset["layers"], heads=preset["heads"],
                                kv_heads=preset["kv_heads"], mlp=preset["mlp"], vision=preset["vision"],
                                max_pixels=224 * 224)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    aim_end_of_sequence(model, processor, processor.tokenizer.eos_token_id)
    model.to(torch.bfloat16 if preset["dtype"] == "bf16" else torch.float32).save_pretrained(folder)
    return folder


@torch.no_grad()
def aim_end_of_sequence(model, processor, eos: int) -> None:
    """Set the eos row of the output layer to s * (the model's mean final hidden state, as a unit vector), with
    s found by bisection so that sampled replies (temperature 1, at most 64 tokens) average EOS_EVERY tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    images = [Image.open(p).convert("RGB") for p in make_images(Path(tempfile.mkdtemp()), 8)]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": PROMPT}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text] * len(images), images=images, return_tensors="pt").to(device)
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1].flatten(0, 1)
    hidden = model.model.language_model.norm(hidden)  # as the output layer sees them (a no-op if normed already)
    direction = hidden.mean(0) / hidden.mean(0).norm()

    def mean_length(scale: float) -> float:
        model.lm_head.weight[eos] = scale * direction
        torch.manual_seed(0)
        new = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64,
                             eos_token_id=eos, pad_token_id=eos)[:, inputs["input_ids"].shape[1]:]
        ended = (new == eos).int()
        return torch.where(ended.any(1), ended.argmax(1), torch.full_like(ended[:, 0], 64)).float().mean().item()

    low, high = 0.0, 64.0  # mean length falls as the scale grows
    for _ in range(12):
        scale = (low + high) / 2
        low, high = (scale, high) if mean_length(scale) > EOS_EVERY else (low, scale)
    model.lm_head.weight[eos] = (low + high) / 2 * direction
    model.to("cpu")


def timed(generate, images: list[Image.Image], batch: int, cfg: GenerationConfig) -> tuple[float, float, float]:
    """(images/s, tokens/s, mean reply length)."""
    generate(images[:batch], cfg)  # warm-up
    torch.manual_seed(0)  # the hf backend samples with torch's generator; vLLM with its own
    tokens, began = 0, time.perf_counter()
    for i in range(0, len(images), batch):
        tokens += sum(r.num_tokens for r in generate(images[i:i + batch], cfg))
    seconds = time.perf_counter() - began
    return len(images) / seconds, tokens / seconds, tokens / len(images)


def report(name: str, figures: tuple[float, float, float]) -> None:
    print(f"{name:28s} {figures[0]:8.2f} images/s {figures[1]:9.1f} tokens/s  {figures[2]:5.1f} tokens/reply",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-images", type=int, default=16, help="images for the one-at-a-time run")
    parser.add_argument("--job-images", type=int, default=64, help="images for the `pixelray caption` runs (0: none)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    cfg = GenerationConfig(max_new_tokens=args.max_tokens, temperature=1.0)  # no seed: one would tie the replies

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_images(work / "images", args.num_images)
        images = [Image.open(p).convert("RGB") for p in paths]
        model = save_model(work / "model", preset)

        hf = create_generator(f"hf:{model}", dtype=preset["dtype"])
        params = sum(p.numel() for p in hf.model.parameters()) / 1e6
        print(f"{len(images)} images, Qwen2-VL architecture ({args.preset}, {params:.0f}M parameters, random, "
              f"{preset['dtype']}), sampled replies (temperature 1) of varied length, at most {args.max_tokens} tokens, "
              f"{os.cpu_count()} CPUs, device {hf.device}", flush=True)
        def captioner(generator):
            return lambda batch, config: generator.generate(batch, PROMPT, config)

        single = timed(captioner(hf), images[: args.single_images], 1, cfg)
        report("hf, one at a time", single)
        batched = timed(captioner(hf), images, args.batch_size, cfg)
        report(f"hf, batches of {args.batch_size}", batched)
        hf = None  # its memory goes back before vLLM takes its own

        vllm = create_generator(f"vllm:{model}?max_model_len=1024", dtype=preset["dtype"])
        continuous = timed(captioner(vllm), images, len(images), cfg)
        report("vllm, one call", continuous)
        vllm.close()
        print(f"vllm / hf batched: {continuous[1] / batched[1]:.2f}x tokens/s, {continuous[0] / batched[0]:.2f}x "
              f"images/s (target >= 2x); hf batched / one at a time: {batched[0] / single[0]:.2f}x images/s",
              flush=True)

        if args.job_images:
            import ray

            from pixelray.pipelines.caption import CaptionConfig, run_caption

            (work / "job").mkdir()
            for p in paths[: args.job_images]:
                (work / "job" / p.name).symlink_to(p)
            ray.init(log_to_driver=False)
            for engine, name in (("hf", f"hf:{model}"), ("vllm", f"vllm:{model}?max_model_len=1024")):
                summary = run_caption(CaptionConfig(input=str(work / "job"), out=str(work / f"job-{engine}"),
                                                    model=name, dtype=preset["dtype"], generation=cfg.model_dump()))
                tokens = pq.read_table(work / f"job-{engine}" / "captions")["num_tokens"].to_numpy().sum()
                print(f"pixelray caption, {engine:4s} end to end: {summary.images_per_s:8.2f} images/s "
                      f"{tokens / summary.seconds:9.1f} tokens/s  ({summary.written} images in "
                      f"{summary.seconds:.1f} s, start-up included)", flush=True)
            ray.shutdown()


if __name__ == "__main__":
    main()

"""Training memory by option: the peak memory of a worker with and without gradient checkpointing, ZeRO-3,
and ZeRO-Offload (optimizer and parameters in CPU memory), on the same model, records and steps.

Run as:
    python benchmarks/train_memory.py                          # CPU: a pixelray model with a 12-layer Qwen2
    python benchmarks/train_memory.py --preset qwen2-0.5b      # a GPU machine: Qwen2-0.5B's sizes, bf16

Each variant is one `pixelray train` stage (every part trains) run through the recipe's own code
(train_jobs.run.run_training) in one Ray instance, on shapes records (64 px images, 64 image tokens, about 100
tokens a record). The figures come from the stage's metrics.csv, which every run writes:
- peak_rss_mib: the largest peak resident set of a worker process (loading, steps and checkpoints included);
- peak_gpu_mib: on a GPU, the largest peak torch allocated there;
- samples/s over the last steps, and the last loss (the options change memory and time, not the arithmetic).
On a CPU the parameters, gradients and optimizer state are in host memory whatever ZeRO-Offload says, so only
checkpointing (and ZeRO-3's partitions across workers) can lower peak_rss_mib there; ZeRO-Offload is measured
for what it costs in time. On a GPU, offload moves its savings from peak_gpu_mib to host memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

PRESETS = {  # the language model (the vision tower is the shapes recipe's ViT: 64 px, 8 px patches)
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2, precision="fp32"),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, precision="bf16"),
}
VARIANTS = {  # name: (config overrides, workers)
    "zero2": ([], 1),
    "zero2 + checkpointing": (["model.gradient_checkpointing=true"], 1),
    "zero2 + offload optimizer": (["deepspeed.offload_optimizer=true"], 1),
    "zero3, 2 workers": (["deepspeed.config=zero3.json"], 2),
    "zero3, 2 workers + offload all": (["deepspeed.config=zero3.json", "deepspeed.offload_optimizer=true",
                                        "deepspeed.offload_params=true"], 2),
    "zero3, 2 workers + offload all + checkpointing": (["deepspeed.config=zero3.json",
                                                        "deepspeed.offload_optimizer=true",
                                                        "deepspeed.offload_params=true",
                                                        "model.gradient_checkpointing=true"], 2),
}


def config(out: Path, data: Path, preset: dict, steps: int, batch_size: int, workers: int, overrides: list[str]):
    from pixelray.train_jobs.config import TrainConfig, load_config

    lm = {k: v for k, v in preset.items() if k != "precision"}
    tree = {
        "output_dir": str(out),
        "model": {"family": "pixelray", "tokenizer": str(data / "tokenizer"),
                  "vision": {"embed_dim": 256, "vision_cfg": {"image_size": 64, "layers": 4, "width": 192,
                                                              "head_width": 32, "patch_size": 8},
                             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1,
                                          "layers": 1}},
                  "text": {"model_type": "qwen2", "max_position_embeddings": 256, "tie_word_embeddings": True,
                           **lm}},
        "data": {"train": str(data / "llava.json"), "max_length": 128, "shuffle_buffer": 0},
        "stages": [{"name": "all", "train": ["vision", "projector", "language_model"], "max_steps": steps,
                    "batch_size": batch_size, "lr": 1e-4, "log_every": 1, "checkpoint_every": steps}],
        "deepspeed": {"config": "zero2.json", "precision": preset["precision"]},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(tree))
    cfg = load_config(path, overrides)
    assert isinstance(cfg, TrainConfig)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16, help="records per worker and step")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    from pixelray.runtime import init_ray
    from pixelray.shapes import train_tokenizer, write_dataset
    from pixelray.train_jobs.run import run_training

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="train-memory-"))
    # two records an image: enough for two workers' steps
    data = write_dataset(work / "data", args.batch_size * args.steps + 8, size=64, conversations_per_image=2)
    train_tokenizer(data / "tokenizer")
    print(f"preset {args.preset}: {json.dumps(PRESETS[args.preset])}; {args.steps} steps of {args.batch_size} "
          f"records per worker")
    print(f"{'variant':<50}{'workers':>8}{'peak RSS MiB':>14}{'peak GPU MiB':>14}{'samples/s':>11}"
          f"{'last loss':>11}{'wall s':>8}")
    for name in args.variants:
        overrides, workers = VARIANTS[name]
        out = work / name.replace(" ", "").replace(",", "_").replace("+", "-")
        started = time.perf_counter()
        run_training(config(out, data, PRESETS[args.preset], args.steps, args.batch_size, workers, overrides))
        with open(out / "all" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        last = rows[-1]
        speed = sum(float(r["samples_per_s"]) for r in rows[1:]) / max(len(rows) - 1, 1)  # the first step warms up
        print(f"{name:<50}{workers:>8}{float(last['peak_rss_mib']):>14,.0f}"
              f"{last.get('peak_gpu_mib') or '-':>14}{speed:>11.1f}{float(last['loss']):>11.4f}"
              f"{time.perf_counter() - started:>8.0f}", flush=True)


if __name__ == "__main__":
    main()

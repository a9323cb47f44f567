"""What makes two training runs give different weights: the same run twice, then one thing changed at a time.

Run as:
    python benchmarks/train_determinism.py                 # the shapes model's sizes, 60 steps of stage 2
    python benchmarks/train_determinism.py --steps 200

Each run is a real `pixelray train` process (its own Ray instance) of one stage of the shapes recipe's
model (the vision tower, the projector and the language model training, from the same random start), on
the same records. Against the first run, each prints the largest absolute difference of any weight and
the last loss:
- again: the same command, the same machine;
- threads: each worker's torch with 1 thread instead of 2 (the CPU kernels split their sums differently);
- kernels: other CPU kernels for the same arithmetic, as another CPU would pick (torch's own without vector
  instructions, ATEN_CPU_CAPABILITY=default; oneDNN's and MKL's held to SSE4, ONEDNN_MAX_CPU_ISA and
  MKL_ENABLE_INSTRUCTIONS);
- workers: 2 workers of 1 CPU instead of 1 of 2 (each its half of the records, gradients all-reduced).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "train_jobs" / "configs" / "shapes.yaml"
VARIANTS = {  # name: (overrides, environment)
    "first": ([], {}),
    "again": ([], {}),
    "threads": (["scaling.cpus_per_worker=1"], {}),
    "kernels": ([], {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                     "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    "workers": (["scaling.num_workers=2", "scaling.cpus_per_worker=1"], {}),
}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    from pixelray.shapes import train_tokenizer, write_dataset

    work = Path(tempfile.mkdtemp(prefix="train-determinism-"))
    data = write_dataset(work / "data", args.steps * 8 + 16, seed=5, size=64)
    train_tokenizer(data / "tokenizer")
    stage = (f"stages=[{{name: s, train: [vision, projector, language_model], max_steps: {args.steps}, "
             f"batch_size: 32, lr: 3.0e-4, warmup_steps: 10, log_every: 10, checkpoint_every: {args.steps}}}]")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} CPUs; {args.steps} steps of 32 records")
    print(f"{'run':<10}{'max |w - w_first|':>20}{'identical':>11}{'last loss':>12}{'seconds':>9}")
    first = None
    for name in args.variants:
        overrides, env = VARIANTS[name]
        out = work / name
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pixelray.cli", "train", "--config", str(SHAPES), f"output_dir={out}",
                        f"model.tokenizer={data / 'tokenizer'}", f"data.train={data / 'llava.json'}", "validation=null",
                        stage, "scaling.num_workers=1", "scaling.cpus_per_worker=2", *overrides],
                       env={**os.environ, **env}, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        got = weights(out / "s" / "model")
        first = first or got
        diff = max((got[k] - first[k]).abs().max().item() for k in first)
        identical = all(torch.equal(got[k], first[k]) for k in first)
        with open(out / "s" / "metrics.csv") as f:
            loss = list(csv.DictReader(f))[-1]["loss"]
        print(f"{name:<10}{diff:>20.3g}{str(identical):>11}{float(loss):>12.4f}{seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()

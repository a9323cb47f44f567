"""Stage 1 of the shapes recipe from a feature store against from its images: the time, and the loss curve.

Run as (from the repository root, after the recipe's data is made as its config's header says):
    pixelray shapes --out runs/shapes/data --num 20000 --tokenizer
    pixelray shapes --out runs/shapes/val --num 100 --seed 1
    python benchmarks/train_from_features.py [--steps 150] [--out runs/bench-features]

Stage 1 trains only the projector: the vision tower stays frozen at the weights it starts with. The benchmark
1. builds the recipe's initial model under its seed and saves it: both runs start from that folder
   (`model.path`), and it is the encoder that embeds the images;
2. `pixelray embed --patches` the recipe's images with that folder as the encoder, timed (paid once, then any
   number of runs read the store);
3. runs stage 1 with the recipe's settings (its validation on images included) from the images, then from the
   store (`stages.0.features`), each through the recipe's own code (train_jobs.run.run_training);
and prints each run's wall time and training samples/s (metrics.csv, which leaves validation out), the
largest difference between the two loss curves, and the validation losses; OUT/loss.png draws both curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train_jobs" / "configs" / "shapes.yaml"


def history(stage_dir: Path) -> list[dict]:
    with open(stage_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="stage 1's steps (the recipe's: 150)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-features"))
    args = parser.parse_args()

    import torch

    from pixelray.pipelines.config import EmbedConfig
    from pixelray.pipelines.embed import run_embed
    from pixelray.runtime import init_ray
    from pixelray.train_jobs.config import load_config
    from pixelray.train_jobs.model import load_model
    from pixelray.train_jobs.run import run_training

    recipe = load_config(RECIPE, [f"stages.0.max_steps={args.steps}"])
    stage1 = recipe.stages[0]
    images = Path(recipe.data.train if isinstance(recipe.data.train, str) else recipe.data.train[0]).parent / "images"
    if not images.is_dir():
        raise SystemExit(f"{images} is missing: make the recipe's data first (see this script's docstring)")
    init_ray()

    init = args.out / "init"  # 1. the initial model, as stage 1 of the recipe builds it
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)

    started = time.perf_counter()  # 2. the store
    summary = run_embed(EmbedConfig(input=str(images), out=str(args.out / "store"), encoder=str(init), patches=True,
                                    overwrite=True))
    embed_s = time.perf_counter() - started
    store_mib = sum(p.stat().st_size for p in (args.out / "store").rglob("*.parquet")) / 2**20
    print(f"embed: {summary.written} images in {embed_s:.0f} s ({summary.written / embed_s:.0f} images/s), "
          f"{summary.errors} errors; store {store_mib:,.0f} MiB", flush=True)

    runs = {}
    for kind, features in (("images", None), ("features", str(args.out / "store"))):  # 3. stage 1, both ways
        cfg = recipe.model_copy(update={"output_dir": str(args.out / kind),
                                        "model": recipe.model.model_copy(update={"path": str(init)}),
                                        "stages": [stage1.model_copy(update={"features": features})]})
        started = time.perf_counter()
        run_training(cfg, overwrite=True)
        runs[kind] = {"wall_s": time.perf_counter() - started, "rows": history(args.out / kind / stage1.name)}

    print(f"{'run':<10}{'wall s':>8}{'samples/s':>11}{'first loss':>12}{'last loss':>11}  val_loss by step")
    for kind, run in runs.items():
        rows = run["rows"]
        speed = sum(float(r["samples_per_s"]) for r in rows[1:]) / max(len(rows) - 1, 1)  # the first warms up
        run["samples_per_s"] = speed
        val = {int(r["step"]): round(float(r["val_loss"]), 4) for r in rows if r.get("val_loss")}
        print(f"{kind:<10}{run['wall_s']:>8.0f}{speed:>11.1f}{float(rows[0]['loss']):>12.4f}"
              f"{float(rows[-1]['loss']):>11.4f}  {val}")
    pairs = list(zip(runs["images"]["rows"], runs["features"]["rows"], strict=True))
    diff = max(abs(float(a["loss"]) - float(b["loss"])) for a, b in pairs)
    print(f"largest loss difference at a logged step: {diff:.2e} (of {len(pairs)} steps logged); "
          f"speed-up {runs['features']['samples_per_s'] / runs['images']['samples_per_s']:.2f}x in samples/s, "
          f"{runs['images']['wall_s'] / runs['features']['wall_s']:.2f}x in wall time")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (kind, run), style in zip(runs.items(), ("-", "--")):
        ax.plot([int(r["step"]) for r in run["rows"]], [float(r["loss"]) for r in run["rows"]], style,
                label=f"from {kind}")
    ax.set(xlabel="step", ylabel="training loss", title="shapes stage 1: from images and from stored features")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss.png", dpi=100)
    (args.out / "result.json").write_text(json.dumps(
        {"embed_s": embed_s, "store_mib": store_mib, "loss_max_diff": diff,
         **{k: {"wall_s": r["wall_s"], "samples_per_s": r["samples_per_s"]} for k, r in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()

"""Run a training config's stages one after another on Ray Train with DeepSpeed (a config with
`recipe: contrastive` goes to train_jobs/contrastive.py instead).

Run as:
    pixelray train --config train_jobs/configs/shapes.yaml [key=value ...] [--resume] [--address ADDR]

Each stage is a TorchTrainer run named after the stage under `output_dir`:

    output_dir/STAGE/checkpoint_*/   DeepSpeed model + optimizer shards, state.json (Ray Train's)
    output_dir/STAGE/model/          the trained model (from_pretrained folder; LoRA merged)
    output_dir/STAGE/adapter/        LoRA stages: the peft adapter
    output_dir/STAGE/metrics.csv     step, epoch, loss, lr, samples/s
    output_dir/STAGE/loss.png        the loss curve

A stage starts from the previous stage's model/ (the first from `model.path`, or new). A worker
that dies is restarted from the last checkpoint (`scaling.max_failures` times); a stopped job goes
on from its last checkpoint with `--resume`, and finished stages are skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pixelray.store import Store
from pixelray.train_jobs.config import ContrastiveConfig, TrainConfig, ValidationConfig
from pixelray.train_jobs.data import (PixelRayCollator, check_lengths, read_records, split_held_out,
                                      with_image_bytes, with_stored_features)
from pixelray.train_jobs.loop import train_loop
from pixelray.train_jobs.model import check_stored_features

logger = logging.getLogger(__name__)


def start_run(cfg: TrainConfig | ContrastiveConfig, out: Path, *, resume: bool, overwrite: bool,
              address: str | None) -> bool:
    """What every recipe does first: claim `out` (an earlier run there needs --resume or --overwrite), write the
    config into it, join or start Ray; returns whether the workers get GPUs."""
    from pixelray.runtime import cluster_resources, init_ray

    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a training run: pass --resume to go on, or --overwrite")
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    # Ray Train's controller polls workers at this interval; its default (~2 s a report) would
    # dominate short steps. It must be set before a local Ray starts (workers inherit it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(address)
    return cluster_resources()[0].get("GPU", 0) > 0 if cfg.scaling.use_gpu == "auto" else cfg.scaling.use_gpu


def run_training(cfg: TrainConfig | ContrastiveConfig, resume: bool = False, overwrite: bool = False,
                 address: str | None = None) -> dict[str, Any]:
    if isinstance(cfg, ContrastiveConfig):  # `recipe: contrastive`: a CLIP-style model (train_jobs/contrastive.py)
        from pixelray.train_jobs.contrastive import run_contrastive

        return run_contrastive(cfg, resume=resume, overwrite=overwrite, address=address)
    cfg = cfg.with_absolute_paths()
    out = Path(cfg.output_dir)
    use_gpu = start_run(cfg, out, resume=resume, overwrite=overwrite, address=address)
    if cfg.model.quantization and not use_gpu:
        raise ValueError(f"model.quantization={cfg.model.quantization} (bitsandbytes) needs CUDA GPUs; "
                         "this cluster has none: train in bf16/fp32 without it")

    datasets: dict[str, ray.data.Dataset] = {}
    init_from, summary = cfg.model.path, {"output_dir": str(out), "stages": {}}
    for index, stage in enumerate(cfg.stages):
        stage_dir = out / stage.name
        if resume and (stage_dir / "model").is_dir():
            logger.info("stage %s: already trained, skipped", stage.name)
            init_from = str(stage_dir / "model")
            continue
        if stage.features:
            check_stored_features(Store.written(stage.features)[1], cfg.model, init_from, cfg.seed)
        source = json.dumps([stage.data or cfg.data.train, stage.features])
        if source not in datasets:
            datasets[source] = _records(cfg, *json.loads(source))
            if cfg.model.family == "pixelray":  # once per data source: stages keep the tokenizer and image size
                for part in filter(None, datasets[source]):
                    logger.info("stage %s: token lengths %s", stage.name, _check_lengths(cfg, part, init_from))
        ds, val = datasets[source]
        records = ds.count()
        if val is not None and val.count() < cfg.scaling.num_workers:
            raise ValueError(f"stage {stage.name}: {val.count()} validation records, fewer than the "
                             f"{cfg.scaling.num_workers} workers that share them")
        per_worker = records // cfg.scaling.num_workers
        steps_per_epoch = per_worker // stage.batch_size // stage.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(f"stage {stage.name}: {records} records are not one step of "
                             f"{cfg.scaling.num_workers} workers x batch {stage.batch_size} x accumulation {stage.grad_accum}")
        total_steps = stage.max_steps or math.ceil(stage.epochs * steps_per_epoch)
        resume_from = _last_checkpoint(stage_dir) if resume else None
        if resume_from:
            logger.info("stage %s: resuming from %s", stage.name, resume_from)
        started = time.perf_counter()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": cfg.model_dump(), "stage": index, "init_from": init_from,
                               "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                               "resume_from": resume_from},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=ray.train.RunConfig(name=stage.name, storage_path=str(out),
                                           failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                                           checkpoint_config=_checkpoints(cfg.validation)),
            # A fixed split of the materialized records, one dataset per rank, read in order: rank r
            # sees the same rows in the same order on every run, so a resumed run sees exactly the
            # batches the interrupted one would have. (Ray Train's own streaming split hands blocks
            # to whichever worker asks first, which differs from run to run.)
            datasets={f"{kind}_{rank}": part for kind, d in (("train", ds), ("val", val)) if d is not None
                      for rank, part in enumerate(d.split(cfg.scaling.num_workers, equal=True))},
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_ordered()),
        )
        result = trainer.fit()
        seconds = time.perf_counter() - started
        with result.checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            for name in ("model", "adapter"):
                if (Path(d) / name).is_dir():
                    shutil.copytree(Path(d) / name, stage_dir / name, dirs_exist_ok=True)
        write_metrics(state["history"], stage_dir)
        init_from = str(stage_dir / ("model" if (stage_dir / "model").is_dir() else "adapter"))
        summary["stages"][stage.name] = {"records": records, "steps": total_steps, "seconds": round(seconds, 1),
                                         "final_loss": state["history"][-1]["loss"], "model": init_from}
        if val is not None:
            summary["stages"][stage.name].update(val_records=val.count(),
                                                 best=_keep_best(result, stage_dir, cfg.validation))
        logger.info("stage %s: %d steps in %.0f s, loss %.4f -> %.4f; model in %s", stage.name, total_steps, seconds,
                    state["history"][0]["loss"], state["history"][-1]["loss"], init_from)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _records(cfg: TrainConfig, source: str | list[str], features: str | None) -> tuple[ray.data.Dataset,
                                                                                      ray.data.Dataset | None]:
    """A stage's (training records, validation records or None), materialised: the training records with their
    images, or with `features` their stored patch tokens; the validation records always with their images."""
    ds, val, held = read_records(cfg.data.model_copy(update={"train": source}), image_bytes=False), cfg.validation, None
    if val and val.fraction:
        ds, held = split_held_out(ds, val.fraction)
    elif val:
        held = read_records(cfg.data.model_copy(update={"train": val.records}), image_bytes=False)
    ds = with_stored_features(ds, features) if features else with_image_bytes(ds)
    return ds.materialize(), with_image_bytes(held).materialize() if held is not None else None


def _checkpoints(val: ValidationConfig | None) -> ray.train.CheckpointConfig:
    """The last two checkpoints; with validation, the best by `validation.best` too (Ray keeps the last anyway)."""
    if not val:
        return ray.train.CheckpointConfig(num_to_keep=2)
    return ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=val.best,
                                      checkpoint_score_order=val.best_order)


def _keep_best(result, stage_dir: Path, val: ValidationConfig) -> dict[str, Any]:
    """Copy the best checkpoint's model (by `validation.best`) to STAGE/best/; its step and scores."""
    pick = min if val.best_order == "min" else max
    checkpoint, metrics = pick(result.best_checkpoints, key=lambda cm: cm[1][val.best])
    with checkpoint.as_directory() as d:
        for name in ("model", "adapter"):
            if (Path(d) / name).is_dir():
                shutil.copytree(Path(d) / name, stage_dir / "best" / name, dirs_exist_ok=True)
    return {"step": metrics["step"], "path": str(stage_dir / "best"),
            **{k: v for k, v in metrics.items() if k.startswith("val_")}}


def _ordered():
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def _check_lengths(cfg: TrainConfig, ds: ray.data.Dataset, init_from: str | None) -> dict[str, int]:
    """Every record must leave room for its reply within data.max_length (pixelray family: the
    image token count is fixed by the config, so this needs no images and no weights)."""
    from pixelray.train_jobs.model import pixelray_config

    config, tokenizer = pixelray_config(cfg.model, init_from)
    return check_lengths(ds, PixelRayCollator(tokenizer, config, cfg.data.max_length))


def _last_checkpoint(stage_dir: Path) -> str | None:
    """The newest checkpoint a stopped run of this stage left (by the step in its state.json)."""
    found = [(json.loads(p.read_text())["step"], p.parent) for p in stage_dir.glob("checkpoint_*/state.json")]
    return str(max(found)[1]) if found else None


def write_metrics(history: list[dict[str, Any]], stage_dir: Path) -> None:
    """metrics.csv and loss.png (matplotlib, without a display) next to the stage's checkpoints."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "metrics.csv", "w", newline="") as f:  # (val_* only on the rows that measured them)
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for h in history for k in h)))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training")
    if val := [h for h in history if "val_loss" in h]:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], marker="o", label="validation")
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=f"stage {history[0]['stage']}", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stage_dir / "loss.png", dpi=100)
    plt.close(fig)

"""The loop every Ray Train worker runs for one stage, top to bottom: set up the model and its
DeepSpeed engine, restore the last checkpoint if there is one, train, report and checkpoint.

It is launched by `train_jobs.run` (`pixelray train`); `loop_config` carries the validated config,
the stage's index, the model folder to start from and the step counts the driver worked out.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pixelray.train_jobs.config import StageConfig, TrainConfig, lr_factor
from pixelray.train_jobs.data import make_collator
from pixelray.train_jobs.model import (apply_stage, export_model, load_model, param_groups, parameter_table,
                                       stage_loss, to_device, train_mode)
from pixelray.train_jobs.validation import validate

CHECKPOINT_TAG = "deepspeed"
logger = logging.getLogger(__name__)


def deepspeed_config(cfg: TrainConfig, stage: StageConfig, device: torch.device) -> dict[str, Any]:
    """The stage's DeepSpeed config: the ZeRO JSON from train_jobs/deepspeed/ plus batch and precision."""
    ds = json.loads(cfg.deepspeed_path().read_text())
    ds.update(train_micro_batch_size_per_gpu=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
              gradient_clipping=stage.grad_clip, steps_per_print=10**9, zero_allow_untested_optimizer=True)
    if cfg.deepspeed.precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs CUDA; use fp32 or bf16 on CPU")
    if cfg.deepspeed.precision != "fp32":
        ds[cfg.deepspeed.precision] = {"enabled": True}
    zero = ds.setdefault("zero_optimization", {})
    pin = device.type == "cuda"  # page-locked host memory: faster copies to and from the GPU
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return ds


def make_optimizer(cfg: TrainConfig, stage: StageConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the stage's parameter groups; with the optimizer offloaded, DeepSpeed's CPU AdamW (its step
    runs on the CPU, vectorised; DeepSpeed refuses torch's there as too slow)."""
    groups = param_groups(model, stage)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=stage.lr, weight_decay=stage.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


def peak_memory(device: torch.device, world: int) -> dict[str, float]:
    """The most memory a worker has held so far, the largest over workers: its process's peak resident set
    (`peak_rss_mib`), and on a GPU the peak torch allocated there (`peak_gpu_mib`)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    values = [rss] + ([torch.cuda.max_memory_allocated(device) / 2**20] if device.type == "cuda" else [])
    peaks = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return dict(zip(("peak_rss_mib", "peak_gpu_mib"), (round(v, 1) for v in peaks.tolist())))


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed

    cfg = TrainConfig.model_validate(loop_config["config"])
    stage = cfg.stages[loop_config["stage"]]
    init_from, total_steps, steps_per_epoch = (loop_config[k] for k in ("init_from", "total_steps", "steps_per_epoch"))
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()

    # 1. Model, frozen parts, optimizer over the trainable ones, DeepSpeed engine.
    torch.manual_seed(cfg.seed)
    model, processing = load_model(cfg.model, init_from, device=device)
    if cfg.data.packing:  # transformers tells packed records apart by their position ids only when no KV cache is made
        model.language_model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_stage(model, stage)
    if rank == 0:
        logger.info("%s", parameter_table(model, f"stage {stage.name}: trainable vs total parameters"))
    collate = make_collator(model, processing, cfg.data.max_length, cfg.data.packing)
    optimizer = make_optimizer(cfg, stage, model)
    # linear warm-up, then cosine decay to min_lr_ratio of the peak
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, stage.warmup_steps, total_steps, stage.min_lr_ratio))
    if device.type == "cpu":  # DeepSpeed's CPU backend compiles a shared-memory all-reduce (a minute or two on a
        # fresh node) that only tensor-parallel inference calls; marked incompatible in DeepSpeed's table of ops
        # (one dict for the process, which keeps edits), it is not built
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg, stage, device))
    train_mode(engine.module)  # the frozen parts in eval mode (BatchNorm statistics kept, as a feature store has them)
    dtype = next(p.dtype for p in engine.module.parameters())

    # 2. Resume: after a worker failure Ray Train hands back this run's last checkpoint; with
    #    `--resume` the driver passes the one the stopped run left behind.
    state: dict[str, Any] = {"step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(loop_config["resume_from"])
                                                if loop_config.get("resume_from") else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=CHECKPOINT_TAG)
            state = json.loads((Path(d) / "state.json").read_text())
        if rank == 0:
            logger.info("resumed stage %s at step %d", stage.name, state["step"])

    # 3. Train: every worker takes the same number of micro-batches from its shard, so the
    #    collective calls line up; a resumed epoch skips (without decoding) what was already seen.
    #    With validation records, the model is measured on them every `eval_every` steps and at each
    #    checkpoint (Ray keeps the best checkpoint by `validation.best`, beside the last).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}") if cfg.validation else None
    eval_every = stage.eval_every or stage.checkpoint_every
    tracker = _tracker(cfg, stage) if rank == 0 else None
    step, started, losses = state["step"], time.perf_counter(), []
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        skip *= stage.grad_accum
        batches = shard.iter_batches(batch_size=stage.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                     local_shuffle_seed=cfg.seed + epoch)
        for micro, batch in enumerate(batches):
            if micro < skip:
                continue
            loss = stage_loss(engine, to_device(collate(batch), device, dtype), stage.loss)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            if (micro + 1) % stage.grad_accum:
                continue
            step += 1
            if cfg.fault and rank == 0 and step == cfg.fault.fail_at_step and not Path(cfg.fault.marker).exists():
                Path(cfg.fault.marker).touch()
                raise RuntimeError(f"fault drill: worker 0 fails at step {step}")
            last = step == total_steps or step % steps_per_epoch == 0
            save = step % stage.checkpoint_every == 0 or step == total_steps
            evaluate = val_shard is not None and (step % eval_every == 0 or save)
            if step % stage.log_every == 0 or save or last or evaluate:
                mean = torch.stack(losses).mean()
                if world > 1:
                    dist.all_reduce(mean, op=dist.ReduceOp.AVG)
                samples = len(losses) * stage.batch_size * world
                metrics = {"stage": stage.name, "step": step, "epoch": step / steps_per_epoch,
                           "loss": round(mean.item(), 6), "lr": scheduler.get_last_lr()[0],
                           "samples_per_s": round(samples / (time.perf_counter() - started), 2),
                           **peak_memory(device, world)}
                if evaluate:
                    metrics.update(validate(engine, val_shard, collate, getattr(processing, "tokenizer", processing),
                                            cfg.validation, stage, device, dtype, world))
                state["history"].append(metrics)
                state["step"] = step
                if tracker:
                    tracker(metrics)
                # the last checkpoint holds the model; with validation every one does (any may be the best)
                export = (cfg, init_from, stage, processing) if step == total_steps or (save and evaluate) else None
                _report(engine, state, rank, metrics, save, export)
                started, losses = time.perf_counter(), []
            if last:
                break
        else:  # the shard ended before the epoch's steps did: never loop on an empty iterator
            raise RuntimeError(f"worker {rank}: the data shard ran out at step {step} of epoch {epoch} "
                               f"({steps_per_epoch} steps per epoch expected)")


def _report(engine, state: dict, rank: int, metrics: dict, save: bool, export: tuple | None) -> None:
    """ray.train.report on every worker; with `save`, each writes its DeepSpeed shards (model and
    optimizer state) into its own folder and Ray merges them into one checkpoint. The final
    checkpoint also holds the exported model (model/, and adapter/ for LoRA) from rank 0."""
    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG)
        if rank == 0:
            (Path(d) / "state.json").write_text(json.dumps(state))
        if export:
            cfg, init_from, stage, processing = export
            full = _gathered_state(engine.module, rank)
            if rank == 0:
                export_model(full, cfg.model, init_from, stage, processing, Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _gathered_state(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's full state dict on rank 0 (ZeRO-3 partitions are gathered first)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return None


def _tracker(cfg: TrainConfig, stage: StageConfig):
    """W&B or MLflow logging, only when asked for (and installed)."""
    if cfg.tracker == "none":
        return None
    try:
        if cfg.tracker == "wandb":
            import wandb

            run = wandb.init(project="pixelray", name=stage.name, config=cfg.model_dump())
            return lambda m: run.log({k: v for k, v in m.items() if k != "stage"}, step=m["step"])
        import mlflow

        mlflow.start_run(run_name=stage.name)
        return lambda m: mlflow.log_metrics({k: v for k, v in m.items() if k != "stage"}, step=m["step"])
    except ImportError as e:
        raise ImportError(f"tracker {cfg.tracker!r} was asked for but is not installed: pip install {cfg.tracker}") from e

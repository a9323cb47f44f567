"""The contrastive recipe: a small CLIP-style image/text model (open_clip's CLIP and ClipLoss, learned
logit scale) trained from random weights on images with captions, on Ray Train (plain torch DDP).

Run as:
    pixelray shapes --out runs/shapes/data --num 20000
    pixelray train --config train_jobs/configs/shapes_clip.yaml

A config with `recipe: contrastive` (train_jobs.config.ContrastiveConfig) comes here from
`run.run_training`. One TorchTrainer run, named `clip`, under `output_dir`:

    output_dir/clip/checkpoint_*/   state.pt (model, optimizer, schedule) and state.json (step, history)
    output_dir/clip/model/          open_clip_config.json + open_clip_model.safetensors, the folder
                                    `create_encoder(DIR, text=True)` loads (`local-dir:` in open_clip)
    output_dir/clip/metrics.csv     step, epoch, loss, logit scale, lr, samples/s (and loss.png)
    output_dir/summary.json         steps, seconds, loss, and the held-out retrieval precision@10

Each worker runs `train_loop` top to bottom: setup, model, optimizer, data, train, save. Batches are
a function of the step (an epoch-seeded permutation, one text drawn per image), so a worker that
fails resumes from the last checkpoint (`scaling.max_failures`) and a stopped job goes on with
`--resume`, both seeing the batches the first run would have.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from PIL import Image
from ray.train.torch import TorchConfig, TorchTrainer

from pixelray.encoders import open_clip_preprocess_cfg, open_clip_transform
from pixelray.shapes import descriptions
from pixelray.train_jobs.config import CaptionDataConfig, ClipModelSettings, ContrastiveConfig, lr_factor

RUN_NAME = "clip"
logger = logging.getLogger(__name__)


# --- the driver ------------------------------------------------------------------------------

def run_contrastive(cfg: ContrastiveConfig, resume: bool = False, overwrite: bool = False,
                    address: str | None = None) -> dict[str, Any]:
    """Train on Ray Train, copy the model out of the final checkpoint, write metrics and the summary."""
    from pixelray.train_jobs.run import start_run, write_metrics

    cfg = cfg.with_absolute_paths()
    out, run_dir = Path(cfg.output_dir), Path(cfg.output_dir) / RUN_NAME
    if resume and (out / "summary.json").is_file() and (run_dir / "model").is_dir():
        logger.info("%s: already trained, nothing to do", run_dir)
        return json.loads((out / "summary.json").read_text())
    use_gpu = start_run(cfg, out, resume=resume, overwrite=overwrite, address=address)

    resume_from = _last_checkpoint(run_dir) if resume else None
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(), "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=str(out),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - started
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        shutil.copytree(Path(d) / "model", run_dir / "model", dirs_exist_ok=True)
    history = state["history"]
    write_metrics(history, run_dir)
    summary = {"output_dir": str(out), "model": str(run_dir / "model"), "steps": cfg.train.max_steps,
               "seconds": round(seconds, 1), "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "logit_scale": history[-1]["logit_scale"],
               "model_mib": round((run_dir / "model" / "open_clip_model.safetensors").stat().st_size / 2**20, 2)}
    if cfg.eval_shapes:
        summary["retrieval_precision_at_10"] = _shapes_precision(run_dir / "model", cfg.eval_shapes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("%s: %d steps in %.0f s, loss %.3f -> %.3f; model in %s", RUN_NAME, cfg.train.max_steps, seconds,
                history[0]["loss"], history[-1]["loss"], run_dir / "model")
    return summary


def _shapes_precision(model_dir: Path, num: int) -> float:
    from pixelray.encoders import create_encoder
    from pixelray.shapes import retrieval_precision

    return round(retrieval_precision(create_encoder(str(model_dir), device="cpu", text=True), num=num)["mean"], 4)


def _last_checkpoint(run_dir: Path) -> str | None:
    found = [(json.loads(p.read_text())["step"], p.parent) for p in run_dir.glob("checkpoint_*/state.json")]
    return str(max(found)[1]) if found else None


# --- what each worker runs -------------------------------------------------------------------

def train_loop(loop_config: dict[str, Any]) -> None:
    # 1. Setup: the config, this worker's place, the same random weights on every worker.
    cfg = ContrastiveConfig.model_validate(loop_config["config"])
    sched = cfg.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    # 2. Model: open_clip's CLIP from its config (DDP-wrapped when there are several workers).
    import open_clip
    from open_clip.loss import ClipLoss

    clip = open_clip.CLIP(**cfg.model.config, output_dict=True)
    preprocess = open_clip_preprocess_cfg(cfg.model.config, cfg.model.preprocess)
    model = ray.train.torch.prepare_model(clip)
    loss_fn = ClipLoss(rank=rank, world_size=world)  # gathers every worker's pairs: one big batch

    # 3. Optimizer: AdamW, decay on weight matrices only (open_clip's rule), warm-up then cosine.
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": sched.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=sched.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, sched.warmup_steps, sched.max_steps, sched.min_lr_ratio))

    # 4. Data: every image preprocessed and every text tokenised once, held in memory.
    data = CaptionPairs(cfg.data, preprocess, cfg.model.config["text_cfg"].get("context_length", 77))
    steps_per_epoch = len(data) // (sched.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} images are not one step of {world} workers x batch {sched.batch_size}")

    state: dict[str, Any] = {"step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(loop_config["resume_from"])
                                                if loop_config.get("resume_from") else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=device)
            state = json.loads((Path(d) / "state.json").read_text())
        clip.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if rank == 0:
            logger.info("resumed at step %d", state["step"])

    # 5. Train.
    model.train()
    step, started, losses = state["step"], time.perf_counter(), []
    while step < sched.max_steps:
        pixels, tokens = data.batch(step, sched.batch_size, rank, world, cfg.seed, steps_per_epoch)
        out = model(pixels.to(device, torch.float32), tokens.to(device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sched.grad_clip:
            torch.nn.utils.clip_grad_norm_(clip.parameters(), sched.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does
        losses.append(loss.detach())
        step += 1
        if step % sched.log_every and step % sched.checkpoint_every and step != sched.max_steps:
            continue
        mean = torch.stack(losses).mean()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        metrics = {"stage": RUN_NAME, "step": step, "epoch": round(step / steps_per_epoch, 4),
                   "loss": round(mean.item(), 6), "logit_scale": round(clip.logit_scale.exp().item(), 3),
                   "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": round(len(losses) * sched.batch_size * world / (time.perf_counter() - started), 2)}
        state["history"].append(metrics)
        state["step"] = step
        save = step % sched.checkpoint_every == 0 or step == sched.max_steps
        _report(clip, optimizer, scheduler, state, metrics, rank, save, cfg.model, preprocess)
        started, losses = time.perf_counter(), []


def _report(clip, optimizer, scheduler, state: dict, metrics: dict, rank: int, save: bool,
            model_cfg: ClipModelSettings, preprocess: dict[str, Any]) -> None:
    """ray.train.report on every worker; with `save`, rank 0 (the weights are the same on all) writes
    the training state and the model folder (a few MB) into the checkpoint."""
    if not (save and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": clip.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, Path(d) / "state.pt")
        (Path(d) / "state.json").write_text(json.dumps(state))
        save_open_clip(clip, model_cfg, preprocess, Path(d) / "model")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def save_open_clip(clip: torch.nn.Module, model_cfg: ClipModelSettings, preprocess: dict[str, Any],
                   out: Path) -> Path:
    """An open_clip folder, as open_clip publishes them: open_clip_config.json ({"model_cfg",
    "preprocess_cfg"}) and open_clip_model.safetensors (fp16 when asked: open_clip's load_state_dict
    copies it into the fp32 model)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg.config, "preprocess_cfg": preprocess}, indent=2))
    dtype = torch.float16 if model_cfg.save_dtype == "fp16" else torch.float32
    weights = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in clip.state_dict().items()}
    save_file(weights, out / "open_clip_model.safetensors")
    return out


# --- the data ----------------------------------------------------------------------------------

class CaptionPairs:
    """Images and their texts from a captions JSON-lines file, preprocessed once and held in memory
    (fp16 pixels: 20,000 images at 64 px are 0.5 GB). Each image's texts are its captions and, for
    shapes records, the shorter true texts (pixelray.shapes.descriptions: "a red star and a blue
    circle", "a red star"); a batch draws one text per image, a short one `short_texts` of the time."""

    def __init__(self, data: CaptionDataConfig, preprocess: dict[str, Any], context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        path = Path(data.train)
        root = Path(data.image_root) if data.image_root else path.parent
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        transform = open_clip_transform(preprocess)
        pixels = []
        for row in rows:
            with Image.open(root / row["image"]) as im:
                pixels.append(transform(im.convert("RGB")).half())
        self.pixels = torch.stack(pixels)
        self.short_texts = data.short_texts
        # per image: its captions (long), then its short texts; all distinct texts tokenised once
        long = [row["captions"] for row in rows]
        short = [descriptions(row["shapes"])[1:] if row.get("shapes") else [] for row in rows]
        vocab: dict[str, int] = {}
        ids = [[vocab.setdefault(t, len(vocab)) for t in (*a, *b)] for a, b in zip(long, short)]
        self.tokens = SimpleTokenizer(context_length=context_length)(list(vocab))
        width = max(map(len, ids))
        self.text_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        self.num_long = torch.tensor([len(a) for a in long])
        self.num_short = torch.tensor([len(b) for b in short])

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, step: int, batch_size: int, rank: int, world: int, seed: int,
              steps_per_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s batch for worker `rank`: its slice of the epoch's permutation, one text each."""
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        start = (index * world + rank) * batch_size
        images = order[start:start + batch_size]
        rng = torch.Generator().manual_seed((seed * 1_000_003 + step) * world + rank)
        use_short = (torch.rand(batch_size, generator=rng) < self.short_texts) & (self.num_short[images] > 0)
        draw = torch.rand(batch_size, generator=rng)
        n_long, n_short = self.num_long[images], self.num_short[images]
        column = torch.where(use_short, n_long + (draw * n_short).long().clamp(max=n_short - 1),
                             (draw * n_long).long().clamp(max=n_long - 1))
        return self.pixels[images], self.tokens[self.text_ids[images, column]]

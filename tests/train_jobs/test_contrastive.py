"""The contrastive recipe (train_jobs/contrastive.py): a real two-worker Ray Train run of a tiny CLIP
on shapes captions, whose output folder loads through the encoder registry with its text tower."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from pixelray.shapes import write_dataset
from pixelray.train_jobs.config import ContrastiveConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = [("model.config={embed_dim: 32, vision_cfg: {image_size: 32, layers: 1, width: 64, head_width: 32, "
         "patch_size: 8}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 1, layers: 1}}"),
        "train.max_steps=4", "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=4",
        "train.warmup_steps=1", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "eval_shapes=0"]


def test_contrastive_recipe_trains_a_loadable_clip(ray_address, tmp_path):
    from pixelray.encoders import create_encoder
    from pixelray.train_jobs.run import run_training

    data = write_dataset(tmp_path / "data", 64, seed=5)
    cfg = load_config(ROOT / "train_jobs" / "configs" / "shapes_clip.yaml",
                      [f"output_dir={tmp_path / 'out'}", f"data.train={data / 'captions.jsonl'}", *TINY])
    assert isinstance(cfg, ContrastiveConfig)
    summary = run_training(cfg)  # the dispatch on `recipe: contrastive`
    model_dir = Path(summary["model"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    saved = json.loads((model_dir / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["embed_dim"] == 32 and saved["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    rows = list(csv.DictReader((model_dir.parent / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(float(r["loss"]) > 0 for r in rows)

    encoder = create_encoder(str(model_dir), device="cpu", text=True, normalize=True)
    images = [data / "images" / f"{i:06d}.png" for i in range(3)]
    image_emb = encoder(images).embedding
    text_emb = encoder.encode_text(["a red star", "a blue circle at the top left"])
    assert image_emb.shape == (3, 32) and text_emb.shape == (2, 32)  # one space: embed_dim
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3)) and torch.isfinite(text_emb).all()
    # the fp16 file holds the trained weights: the loaded tower gives what the saved weights give
    logit_scale = encoder.model.logit_scale.exp().item()
    assert abs(logit_scale - float(rows[-1]["logit_scale"])) < 0.05 * logit_scale

"""Validation while training (`validation:` in the config): the mean loss over the held-out records, and
the replies the model generates for a sample of them, scored as `pixelray eval` scores captions and answers.

Every worker measures its own share (the driver splits the records equally), so ZeRO-3's parameter gathers
line up: each worker runs as many forward passes. (Generation is not offered under ZeRO-3: the config says so.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pixelray.metrics import caption_scores, normalize_answer
from pixelray.train_jobs.config import StageConfig, ValidationConfig
from pixelray.train_jobs.model import stage_loss, to_device, train_mode


def validate(engine, shard, collate, tokenizer, cfg: ValidationConfig, stage: StageConfig, device: torch.device,
             dtype: torch.dtype, world: int) -> dict[str, float]:
    """{"val_loss"} over all of this worker's records (weighted by records, then over workers), and with
    `cfg.generate` the scores of the generated replies (see `reply_scores`), rounded for metrics.csv."""
    engine.eval()
    total = torch.zeros(2, device=device)  # loss x records, records
    sample: list[dict[str, np.ndarray]] = []
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=stage.batch_size, batch_format="numpy"):
            n = len(batch["id"])
            total += torch.stack([stage_loss(engine, to_device(collate(batch), device, dtype), stage.loss).float() * n,
                                  torch.tensor(float(n), device=device)])
            if sum(len(b["id"]) for b in sample) < cfg.generate:
                sample.append(batch)
        pairs = []
        if cfg.generate:
            rows = {k: np.concatenate([b[k] for b in sample])[: cfg.generate] for k in sample[0]}
            pairs = generated_replies(engine.module, rows, collate, tokenizer, device, dtype, cfg.max_new_tokens)
    train_mode(engine.module)
    if world > 1:
        dist.all_reduce(total)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    metrics = {"val_loss": (total[0] / total[1]).item()}
    if pairs:
        metrics.update(reply_scores(pairs))
    return {k: round(v, 6) for k, v in metrics.items()}


def generated_replies(module, rows: dict[str, np.ndarray], collate, tokenizer, device: torch.device,
                      dtype: torch.dtype, max_new_tokens: int) -> list[tuple[str, str]]:
    """(generated, reference) for each record, one at a time (no padding to get right): the prompt is the
    record up to its first reply, which is the reference; greedy, as `pixelray caption` generates."""
    pairs = []
    for i in range(len(rows["id"])):
        inputs = to_device(collate({k: v[i: i + 1] for k, v in rows.items()}), device, dtype)
        labels = inputs.pop("labels")[0]
        start = int((labels != -100).nonzero()[0])
        end = start + int((labels[start:] == -100).cumsum(0).eq(0).sum())  # the first reply's last token + 1
        inputs.pop("position_ids", None)  # a packed row of one record: its positions are the usual ones
        width = inputs["input_ids"].shape
        prompt = {k: v[:, :start] if v.shape == width else v for k, v in inputs.items()}
        out = module.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        # the pixelray model returns the new tokens only (its prompt goes in as embeddings); the others, both
        new = out[0] if module.config.model_type == "pixelray" else out[0, start:]
        pairs.append((tokenizer.decode(new, skip_special_tokens=True).strip(),
                      tokenizer.decode(labels[start:end], skip_special_tokens=True).strip()))
    return pairs


def reply_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """BLEU-4, CIDEr-D and ROUGE-L of the generated replies against the references (one each), and the share
    equal to theirs after VQA answer normalisation (for one-word answers, the VQA accuracy)."""
    scores = caption_scores({str(i): [ref] for i, (_, ref) in enumerate(pairs)},
                            {str(i): gen for i, (gen, _) in enumerate(pairs)})
    exact = sum(normalize_answer(gen) == normalize_answer(ref) for gen, ref in pairs) / len(pairs)
    return {"val_bleu4": scores["BLEU-4"], "val_cider": scores["CIDEr"], "val_rouge_l": scores["ROUGE-L"],
            "val_exact": exact}

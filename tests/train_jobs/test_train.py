"""Training: configs, data readers and collators, freezing per stage, and real two-worker Ray Train
runs with DeepSpeed ZeRO-2 / ZeRO-3 (loss falls, a failed worker resumes identically, LoRA
adapters round-trip, a killed job goes on with --resume)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from pydantic import ValidationError

from pixelray.images import image_id
from pixelray.llava import IMAGE_TAG
from pixelray.shapes import train_tokenizer, write_dataset
from pixelray.train_jobs.config import DataConfig, LoraSettings, StageConfig, load_config
from pixelray.train_jobs.data import PixelRayCollator, held_out, make_collator, read_records, to_messages
from pixelray.train_jobs.model import apply_stage, load_model, param_groups, parameter_table, part_of, reply_mean_loss

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "train_jobs" / "configs" / "debug.yaml"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    out = write_dataset(tmp_path_factory.mktemp("shapes"), 48, seed=3, conversations_per_image=2)
    train_tokenizer(out / "tokenizer")
    return out


def debug_config(out: Path, data: Path, *overrides: str):
    return load_config(DEBUG, [f"output_dir={out}", f"model.tokenizer={data / 'tokenizer'}",
                               f"data.train={data / 'llava.json'}", *overrides])


def numpy_batch(records: list[dict], root: Path) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to the collator (a record's `image` one path or a list of them)."""
    images = [[r["image"]] if isinstance(r["image"], str) else r["image"] for r in records]

    def objects(values: list) -> np.ndarray:
        return np.array(values + [None], dtype=object)[:-1]  # one object per record, lists kept whole

    return {"id": np.array([r["id"] for r in records]), "images": objects(images),
            "data": objects([[(root / i).read_bytes() for i in paths] for paths in images]),
            "conversations": objects([r["conversations"] for r in records])}


def test_config_overrides_and_validation(tmp_path):
    cfg = load_config(DEBUG, ["stages.1.lr=3e-4", "scaling.num_workers=1", "data.max_length=99",
                              "stages.0.lora={r: 4}", "stages.0.train=[projector]"])
    assert cfg.stages[1].lr == 3e-4 and cfg.scaling.num_workers == 1 and cfg.data.max_length == 99
    assert cfg.stages[0].lora == LoraSettings(r=4)
    with pytest.raises(ValidationError, match="extra"):
        load_config(DEBUG, ["stages.0.learning_rate=1"])
    with pytest.raises(ValueError, match="'stages.5.lr=1' does not apply"):
        load_config(DEBUG, ["stages.5.lr=1"])
    with pytest.raises(ValueError, match="'stages.first.lr=1' does not apply"):
        load_config(DEBUG, ["stages.first.lr=1"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(DEBUG, ["stages"])
    with pytest.raises(ValidationError, match="LoRA adapts the language model"):
        StageConfig(name="s", train=["language_model"], lora=LoraSettings())
    with pytest.raises(ValidationError, match="model.path is required"):
        load_config(DEBUG, ["model.family=hf"])
    with pytest.raises(ValidationError, match="does not train"):
        load_config(DEBUG, ["stages.0.part_lr={vision: 1.0e-3}"])


def test_the_learning_rate_schedule_is_transformers():
    """lr_factor (torch's LambdaLR, in both recipes) gives what transformers' warm-up + cosine schedule gives."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from pixelray.train_jobs.config import lr_factor

    for warmup, total, floor in ((0, 10, 0.1), (3, 20, 0.0), (5, 6, 0.5)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=floor)
        for step in range(total + 1):
            assert lr_factor(step, warmup, total, floor) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12)


def test_readers_take_both_formats(ray_address, shapes_data, tmp_path):
    llava = json.loads((shapes_data / "llava.json").read_text())[:6]
    (tmp_path / "l.json").write_text(json.dumps(llava))
    simple = [{"image": str(shapes_data / r["image"]), "text": r["conversations"][1]["value"], "prompt": "Describe."}
              for r in llava]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in simple))
    pq.write_table(pa.Table.from_pylist(simple), tmp_path / "s.parquet")
    cfg = debug_config(tmp_path, shapes_data).data
    rows = read_records(cfg.model_copy(update={"train": str(tmp_path / "l.json"),
                                               "image_root": str(shapes_data)})).take_all()
    by_id = {r["id"]: r for r in rows}  # Ray Data does not promise row order here
    assert sorted(by_id) == sorted(r["id"] for r in llava)
    first = by_id[llava[0]["id"]]
    assert list(first["images"]) == [str(shapes_data / llava[0]["image"])]
    assert list(first["data"]) == [(shapes_data / llava[0]["image"]).read_bytes()]
    for name in ("s.jsonl", "s.parquet"):
        rows = read_records(cfg.model_copy(update={"train": str(tmp_path / name)})).take_all()
        first = next(r for r in rows if list(r["images"]) == [simple[0]["image"]]
                     and r["conversations"][1]["value"] == simple[0]["text"])
        assert len(rows) == 6 and list(first["data"]) == [(shapes_data / llava[0]["image"]).read_bytes()]
        assert [dict(t) for t in first["conversations"]] == [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": simple[0]["text"]}]
    with pytest.raises(ValueError, match=".json, .jsonl or .parquet"):
        read_records(cfg.model_copy(update={"train": str(tmp_path / "x.csv")}))

    # a record of several images (a list, each image where its tag is) beside records of one, in one file
    (tmp_path / "m.json").write_text(json.dumps([llava[0], llava[2], two_images(llava)]))
    several = cfg.model_copy(update={"train": str(tmp_path / "m.json"), "image_root": str(shapes_data)})
    pair = next(r for r in read_records(several).take_all() if r["id"] == "pair")
    assert list(pair["images"]) == [str(shapes_data / llava[i]["image"]) for i in (0, 2)]
    assert list(pair["data"]) == [(shapes_data / llava[i]["image"]).read_bytes() for i in (0, 2)]
    untagged = dict(two_images(llava), conversations=[{"from": "human", "value": "<image>\nWhich?"},
                                                      {"from": "gpt", "value": "the first"}])
    (tmp_path / "untagged.json").write_text(json.dumps([untagged]))
    with pytest.raises(ray.exceptions.RayTaskError, match=r"record pair: 2 image\(s\) but 1 <image> tag\(s\)"):
        read_records(cfg.model_copy(update={"train": str(tmp_path / "untagged.json")})).take_all()

    # a dedup table that drops the first record's image: its records are left out, by the id `pixelray embed` gives it
    dropped = str(shapes_data / llava[0]["image"])
    pq.write_table(pa.table({"image_id": [image_id(dropped)], "keep": [False]}), tmp_path / "dedup.parquet")
    rows = read_records(cfg.model_copy(update={"train": str(tmp_path / "l.json"), "image_root": str(shapes_data),
                                               "exclude": str(tmp_path / "dedup.parquet")})).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in llava if str(shapes_data / r["image"]) != dropped)
    assert len(rows) < len(llava)
    # a record of several images goes when any of them does
    rows = read_records(several.model_copy(update={"exclude": str(tmp_path / "dedup.parquet")})).take_all()
    assert [r["id"] for r in rows] == [llava[2]["id"]]


def two_images(records: list[dict]) -> dict:
    """A record of two images (those of the first and third records: two records an image), the prompt's text
    between and after them."""
    return {"id": "pair", "image": [records[0]["image"], records[2]["image"]], "conversations": [
        {"from": "human", "value": "<image>\nLeft, and right:\n<image>\nWhich has more shapes?"},
        {"from": "gpt", "value": "the first"}]}


def test_records_of_several_images(shapes_data, tiny_vlm_dirs):
    """Two images in one record: each where its tag is, every image's tokens and pixels in the batch, and the
    second image read by the model (changing it changes the reply's logits); the same through the processors
    of the off-the-shelf families that take several, and PaliGemma's refusal."""
    records = json.loads((shapes_data / "llava.json").read_text())
    pair = two_images(records)
    model, tokenizer = load_model(debug_config(shapes_data, shapes_data).model)
    collate = make_collator(model, tokenizer, max_length=300)
    batch = collate(numpy_batch([pair, records[4]], shapes_data))
    tokens = IMAGE_TAG * model.config.num_image_tokens
    assert tokenizer.decode(batch["input_ids"][0]) == (
        f"<|im_start|>user\n{tokens}Left, and right:{tokens}Which has more shapes?<|im_end|>\n"
        "<|im_start|>assistant\nthe first<|im_end|>\n")
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # the pair's two, then the single record's
    with torch.no_grad():
        logits = model(**batch).logits
        other = dict(batch, pixel_values=batch["pixel_values"][[0, 2, 2]])  # the pair's second image replaced
        changed = model(**other).logits
    reply = batch["labels"][0] != -100
    assert not torch.allclose(logits[0][reply], changed[0][reply]) and torch.equal(logits[1], changed[1])
    # a later turn's image cut by max_length is an error, not a record that fails in the model
    later = {"id": "later", "image": pair["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a red star"},
        {"from": "human", "value": "And this one?\n<image>"}, {"from": "gpt", "value": "a blue circle"}]}
    with pytest.raises(ValueError, match="record later: max_length=50 cuts its images' tokens"):
        make_collator(model, tokenizer, max_length=50)(numpy_batch([later], shapes_data))

    from transformers import AutoModelForImageTextToText, AutoProcessor

    for name in ("llava", "qwen2_vl", "smolvlm"):
        hf, processor = (c.from_pretrained(tiny_vlm_dirs[name]) for c in (AutoModelForImageTextToText, AutoProcessor))
        one, two = (make_collator(hf, processor, 2048)(numpy_batch([r], shapes_data)) for r in (records[0], pair))
        image_tokens = [int((batch["input_ids"] == hf.config.image_token_id).sum()) for batch in (one, two)]
        assert image_tokens[1] == 2 * image_tokens[0] > 0, name
        assert torch.isfinite(hf(**two).loss), name
    paligemma = make_collator(*(c.from_pretrained(tiny_vlm_dirs["paligemma"])
                                for c in (AutoModelForImageTextToText, AutoProcessor)), 2048)
    with pytest.raises(ValueError, match=r"records \['pair'\] have several images; paligemma takes one"):
        paligemma(numpy_batch([pair], shapes_data))


def test_collator_labels_only_the_replies(shapes_data):
    cfg = debug_config(shapes_data, shapes_data)
    model, tokenizer = load_model(cfg.model)
    collate = make_collator(model, tokenizer, max_length=200)
    assert isinstance(collate, PixelRayCollator)
    two_turns = {"id": "t", "image": "images/000000.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is at the top?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]}
    batch = collate(numpy_batch([two_turns], shapes_data))
    labelled = batch["input_ids"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(labelled) == "circle<|im_end|>\ntwo<|im_end|>\n"
    image_id = model.config.image_token_id
    assert int((batch["input_ids"][0] == image_id).sum()) == model.config.num_image_tokens
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # loss: reply averages each reply's tokens first: "circle<|im_end|>" and "two<|im_end|>" count the same
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    replies: list[list[int]] = []
    for i in torch.nonzero(targets != -100).flatten().tolist():  # runs of labelled positions
        if replies and replies[-1][-1] == i - 1:
            replies[-1].append(i)
        else:
            replies.append([i])
    per_reply = [torch.nn.functional.cross_entropy(logits[r], targets[r]) for r in replies]
    assert len(replies) == 2 and len(replies[0]) != len(replies[1])  # "circle" and "two" differ in tokens
    assert torch.allclose(reply_mean_loss(model(**batch).logits, batch["labels"]), sum(per_reply) / 2, atol=1e-5)
    # a prompt that fills max_length leaves nothing to learn: an error naming the record, never a silent sample
    with pytest.raises(ValueError, match="record t: prompt and image tokens fill max_length=20"):
        make_collator(model, tokenizer, max_length=20)(numpy_batch([two_turns], shapes_data))
    with pytest.raises(ValueError, match="unknown conversation role"):
        to_messages([{"from": "robot", "value": "hi"}])


def test_packed_records_train_as_the_unpacked(shapes_data):
    """`data.packing`: a batch of captions and one-word answers in fewer, fuller rows, each record attending only
    to itself: every record's logits and the batch's loss (both kinds) are the unpacked batch's."""
    records = json.loads((shapes_data / "vqa.json").read_text())[:11]
    questions = [turn for r in records[1:4] for turn in r["conversations"]]  # and one long conversation
    records.append(dict(records[0], id="long", conversations=records[0]["conversations"] + [
        dict(t, value=t["value"].replace("<image>\n", "")) for t in questions]))
    model, tokenizer = load_model(debug_config(shapes_data, shapes_data).model)
    model.language_model.config.use_cache = False  # as the training loop sets it for packing
    batch = numpy_batch(records, shapes_data)
    plain, packed = (make_collator(model, tokenizer, 200, packing)(batch) for packing in (False, True))
    lengths = plain["attention_mask"].sum(1).tolist()
    assert len(packed["input_ids"]) < len(plain["input_ids"]) == 12 and packed["input_ids"].shape[1] <= 200
    assert packed["input_ids"].numel() < plain["input_ids"].numel() * 0.7  # far less padding
    with torch.no_grad():
        out = {name: model(**b) for name, b in (("plain", plain), ("packed", packed))}
        # row by row, record by record: where packing put each record, its logits are the unpacked ones
        starts = (packed["position_ids"] == 0).nonzero().tolist()
        spans = [(row, col) for row, col in starts if packed["input_ids"][row, col] != tokenizer.pad_token_id]
        assert len(spans) == 12
        for record, (row, col) in enumerate(spans):
            n = lengths[record]
            assert torch.allclose(out["packed"].logits[row, col: col + n], out["plain"].logits[record, :n],
                                  atol=1e-4), record
        assert torch.allclose(out["packed"].loss, out["plain"].loss, atol=1e-5)
        assert torch.allclose(reply_mean_loss(out["packed"].logits, packed["labels"]),
                              reply_mean_loss(out["plain"].logits, plain["labels"]), atol=1e-5)
    with pytest.raises(ValidationError, match="packing is for the pixelray family"):
        load_config(ROOT / "train_jobs/configs/vlm_lora.yaml", ["data.packing=true"])


def test_parts_and_freezing_per_stage(shapes_data, tiny_vlm_dirs):
    model, _ = load_model(debug_config(shapes_data, shapes_data).model)
    stage1 = apply_stage(model, StageConfig(name="s1", train=["projector"]))
    trainable = {n.split(".")[0] for n, p in stage1.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    stage2 = apply_stage(model, StageConfig(name="s2", train=["projector", "language_model"]))
    assert all(p.requires_grad == (not n.startswith("vision.")) for n, p in stage2.named_parameters())
    # a part's own learning rate: one optimizer group per rate, covering every trainable parameter
    stage = StageConfig(name="s2", train=["vision", "projector", "language_model"], lr=1e-4, part_lr={"vision": 1e-3})
    groups = {g["lr"]: g["params"] for g in param_groups(apply_stage(model, stage), stage)}
    assert sorted(groups) == [1e-4, 1e-3]
    assert {id(p) for p in groups[1e-3]} == {id(p) for p in model.vision.parameters()}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    lora = apply_stage(model, StageConfig(name="s3", train=["projector"], lora=LoraSettings(r=2)))
    for name, p in lora.named_parameters():
        expected = "lora_" in name or ("projector" in name and "modules_to_save" in name)
        assert p.requires_grad == expected, name
    assert "lora" in parameter_table(lora)
    # every parameter of every supported family belongs to exactly one part
    from transformers import AutoModelForImageTextToText

    for family in ("llava", "qwen2_vl", "smolvlm", "paligemma"):
        hf = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dirs[family])
        parts = {part_of(n) for n, _ in hf.named_parameters()}
        assert parts == {"vision", "projector", "language_model"}, family


def _saved_bytes_and_grads(model, batch: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """The bytes autograd keeps for the backward pass of one training step (checkpointed layers keep their own,
    out of this count, and recompute the rest), and the gradients that step gives."""
    saved = 0

    def keep(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.train().zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_less_for_the_same_gradients(shapes_data, tiny_vlm_dirs):
    """`model.gradient_checkpointing`: the pixelray model (its LM's and its open_clip tower's layers) and an
    off-the-shelf family keep far fewer activations for the backward pass, and give the same gradients."""
    records = json.loads((shapes_data / "llava.json").read_text())[:4]
    for cfg in (debug_config(shapes_data, shapes_data).model,
                load_config(ROOT / "train_jobs/configs/vlm_lora.yaml", [f"model.path={tiny_vlm_dirs['llava']}"]).model):
        model, processing = load_model(cfg)
        model.config.use_cache = False
        batch = make_collator(model, processing, 128)(numpy_batch(records, shapes_data))
        kept, grads = _saved_bytes_and_grads(model, batch)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kept_checkpointed, grads_checkpointed = _saved_bytes_and_grads(model, batch)
        assert kept_checkpointed < kept / 2, (cfg.family, kept, kept_checkpointed)
        assert grads.keys() == grads_checkpointed.keys() and {part_of(n) for n in grads} == {"vision", "projector",
                                                                                            "language_model"}
        for name, grad in grads.items():
            assert torch.allclose(grad, grads_checkpointed[name], rtol=1e-4, atol=1e-6), (cfg.family, name)


def _history(stage_dir: Path) -> list[dict]:
    with open(stage_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_validation_settings_are_checked(tmp_path, shapes_data):
    (tmp_path / "zero1.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    for overrides, message in ((["validation.fraction=0.2", "validation.records=x.json"], "one of them"),
                               (["validation.generate=0"], "one of them"),
                               (["validation.fraction=0.2", "validation.best=val_cider"], "generation score"),
                               (["deepspeed.offload_params=true"], "offload_params needs ZeRO-3"),
                               ([f"deepspeed.config={tmp_path / 'zero1.json'}", "deepspeed.offload_optimizer=true"],
                                "needs ZeRO-2 or ZeRO-3")):
        with pytest.raises(ValidationError, match=message):
            debug_config(tmp_path, shapes_data, *overrides)


def test_replies_generated_from_records_are_the_captioners(shapes_data):
    """The bundled (trained) shapes model: each record's prompt, cut where its reply starts, gives the reply
    `pixelray caption` generates for that image and prompt; the reference is the record's reply."""
    from pixelray.generators import BUNDLED, GenerationConfig, create_generator
    from pixelray.train_jobs.config import ModelConfig
    from pixelray.train_jobs.validation import generated_replies, reply_scores

    model, tokenizer = load_model(ModelConfig(family="pixelray", path=str(BUNDLED / "shapes-demo")))
    records = json.loads((shapes_data / "llava.json").read_text())[:8]  # captions and questions
    pairs = generated_replies(model.eval(), numpy_batch(records, shapes_data), make_collator(model, tokenizer, 128),
                              tokenizer, torch.device("cpu"), torch.float32, 24)
    captioner = create_generator("shapes-demo", device="cpu")
    for record, (generated, reference) in zip(records, pairs, strict=True):
        prompt = to_messages(record["conversations"])[0]["content"][-1]["text"]
        [expected] = captioner.generate([shapes_data / record["image"]], prompt, GenerationConfig(max_new_tokens=24))
        assert (generated, reference) == (expected.text, record["conversations"][1]["value"])
    scores = reply_scores(pairs)
    assert scores["val_exact"] >= 0.75 and scores["val_cider"] > 1  # a trained model: most replies are right
    assert reply_scores([("a red star", "a red star")])["val_exact"] == 1
    assert reply_scores([("Two.", "2")])["val_exact"] == 1 and reply_scores([("no", "yes")])["val_exact"] == 0


@pytest.mark.slow
def test_two_stages_zero2_two_workers(ray_address, shapes_data, tmp_path):
    from pixelray.generators import create_generator
    from pixelray.train_jobs.run import run_training
    from pixelray.vlm import PixelRayForConditionalGeneration

    # stage 2 reads its own records (the question-heavy vqa.json) with the loss averaged per reply
    # held-out records scored by the replies generated for them, 2 per worker (best: the most CIDEr)
    cfg = debug_config(tmp_path / "run", shapes_data, "stages.1.max_steps=10", "stages.1.lr=3e-3",
                       "deepspeed.config=zero2.json", f"stages.1.data={shapes_data / 'vqa.json'}",
                       "stages.1.loss=reply", f"validation.records={shapes_data / 'llava.json'}",
                       "validation.generate=2", "validation.max_new_tokens=4", "validation.best=val_cider")
    summary = run_training(cfg)
    s1, s2 = (tmp_path / "run" / s for s in ("stage1", "stage2"))
    history = _history(s2)
    scored = [h for h in history if h["val_loss"]]
    assert [int(h["step"]) for h in scored] == [2, 4, 6, 8, 10]
    for h in scored:  # 4 replies scored each time: val_exact is a multiple of 1/4
        assert float(h["val_cider"]) >= 0 and float(h["val_exact"]) * 4 in (0, 1, 2, 3, 4)
    best = max(scored, key=lambda h: float(h["val_cider"]))  # (the first of equals, as Ray keeps it)
    assert summary["stages"]["stage2"]["best"]["val_cider"] == float(best["val_cider"])
    assert float(history[-1]["loss"]) < float(history[0]["loss"]) - 0.5
    assert (s1 / "loss.png").stat().st_size > 1000 and summary["stages"]["stage2"]["steps"] == 10
    first, second = (PixelRayForConditionalGeneration.from_pretrained(s / "model") for s in (s1, s2))
    # the vision tower stayed frozen through both stages; stage 2 started from stage 1's projector and moved it
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        if name.startswith("vision."):
            assert torch.equal(a, b), name
    assert not torch.equal(first.projector[0].weight, second.projector[0].weight)
    generator = create_generator(str(s2 / "model"))
    from PIL import Image

    result = generator.generate([Image.open(shapes_data / "images/000000.png")], "Describe the image.")
    assert result[0].num_tokens >= 1


@pytest.mark.slow
def test_zero3_lora_adapter_round_trip_with_validation(ray_address, shapes_data, tmp_path):
    """ZeRO-3 on two workers, a LoRA stage; a quarter of the images held out, their loss measured while training
    (every worker as many forward passes, as ZeRO-3's gathers need). The memory options on: the optimizer and the
    parameters offloaded to CPU memory, gradient checkpointing, packed records."""
    from peft import PeftModel

    from pixelray.train_jobs.run import run_training
    from pixelray.vlm import PixelRayForConditionalGeneration

    stage = ("stages=[{name: lora, train: [projector], lora: {r: 4, alpha: 8}, max_steps: 8, batch_size: 4, "
             "lr: 3.0e-3, log_every: 1, checkpoint_every: 2, eval_every: 3}]")
    cfg = debug_config(tmp_path / "run", shapes_data, stage, "deepspeed.config=zero3.json", "validation.fraction=0.25",
                       "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                       "model.gradient_checkpointing=true", "data.packing=true")
    summary = run_training(cfg)["stages"]["lora"]
    out = tmp_path / "run" / "lora"
    history = _history(out)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    assert all(300 < float(h["peak_rss_mib"]) < 24 * 1024 for h in history)  # a worker's peak, on every row
    assert (out / "adapter" / "adapter_config.json").is_file()

    # validation: the held-out images' records, never trained on
    records = json.loads((shapes_data / "llava.json").read_text())
    held = [r for r in records if held_out(str(shapes_data / r["image"]), 0.25)]
    assert 0 < summary["val_records"] == len(held) and summary["records"] == len(records) - len(held)
    measured = {int(h["step"]): float(h["val_loss"]) for h in history if h["val_loss"]}
    assert sorted(measured) == [2, 3, 4, 6, 8]  # every eval_every steps, and at each checkpoint
    # the best checkpoint (steps 2, 4, 6, 8) by validation loss, kept beside the last
    assert summary["best"]["step"] == min((2, 4, 6, 8), key=measured.get)
    assert summary["best"]["val_loss"] == measured[summary["best"]["step"]]
    with pytest.raises(ValidationError, match="not offered under ZeRO-3"):
        debug_config(tmp_path, shapes_data, "deepspeed.config=zero3.json", "validation.fraction=0.25",
                     "validation.generate=2")
    assert (out / "best" / "adapter" / "adapter_config.json").is_file() and (out / "best" / "model").is_dir()
    # the initial model + adapter, merged by peft == the merged model the run exported
    base = _initial_model(cfg, cfg.seed, tmp_path / "base")
    merged = PeftModel.from_pretrained(PixelRayForConditionalGeneration.from_pretrained(base),
                                       out / "adapter").merge_and_unload()
    exported = PixelRayForConditionalGeneration.from_pretrained(out / "model")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        expected, got = merged(**batch).logits, exported(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5)
    untrained = PixelRayForConditionalGeneration.from_pretrained(base)(**batch).logits
    assert not torch.allclose(untrained, got, atol=1e-4)  # the adapter changed the LM


def _initial_model(cfg, seed: int, out: Path) -> Path:
    """The model a first stage builds from `cfg` under `seed`, saved as a folder (a `model.path`, and an encoder)."""
    torch.manual_seed(seed)
    model, tokenizer = load_model(cfg.model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_feature_store_must_hold_the_models_tower(shapes_data, tiny_dinov2, tmp_path):
    from pixelray.train_jobs.model import check_stored_features, initial_vision_tower

    cfg = debug_config(tmp_path / "run", shapes_data, "model.vision_stem=[8, 16, 32]")  # BatchNorm in the tower
    ours, other = _initial_model(cfg, 0, tmp_path / "seed0"), _initial_model(cfg, 1, tmp_path / "seed1")
    # the tower a stage starts from, built alone, is the one load_model builds first under the seed
    torch.manual_seed(0)
    built = load_model(cfg.model)[0].vision.state_dict()
    alone = initial_vision_tower(cfg.model, None, 0).state_dict()
    assert built.keys() == alone.keys() and all(torch.equal(built[k], alone[k]) for k in built)

    def manifest(encoder, **settings) -> dict:
        return {"job": "embed", "encoder": str(encoder), "encoder_source": str(encoder), "pretrained": None,
                "patches": True, "normalize": False, **settings}

    check_stored_features(manifest(ours), cfg.model, None, seed=0)  # built from scratch under seed 0
    check_stored_features(manifest(ours), cfg.model, str(ours), seed=5)  # loaded from the folder: no seed involved
    with pytest.raises(ValueError, match=r"is not the tower this stage starts from: \d+ of \d+ tensors differ"):
        check_stored_features(manifest(other), cfg.model, None, seed=0)
    with pytest.raises(ValueError, match="no patch features.*L2-normalised"):
        check_stored_features(manifest(ours, patches=False, normalize=True), cfg.model, None, seed=0)
    bundled = ROOT / "pixelray" / "models" / "shapes-demo"  # another pixelray model: 64 px images, not 32
    with pytest.raises(ValueError, match="preprocesses images as .*'size': 64.*the model as .*'size': 32"):
        check_stored_features(manifest(bundled), cfg.model, None, seed=0)
    with pytest.raises(ValueError, match="is a transformers model"):
        check_stored_features(manifest(tiny_dinov2), cfg.model, None, seed=0)
    with pytest.raises(ValidationError, match="stored features stand in for a frozen vision tower"):
        debug_config(tmp_path, shapes_data, f"stages.0.features={tmp_path}", "stages.0.train=[vision, projector]")


@pytest.mark.slow
def test_a_stage_trains_from_stored_features_as_from_its_images(ray_address, shapes_data, tmp_path):
    """`pixelray embed --patches` with the model's folder as the encoder, then the projector stage from that
    store: its first batch's loss is the one the images give, and the frozen tower stays untouched (its
    BatchNorm statistics too). (benchmarks/train_from_features.py compares whole runs.)"""
    from pixelray.pipelines.config import EmbedConfig
    from pixelray.pipelines.embed import run_embed
    from pixelray.train_jobs.data import with_stored_features
    from pixelray.train_jobs.run import run_training
    from pixelray.vlm import PixelRayForConditionalGeneration

    stem = "model.vision_stem=[8, 16, 32]"
    init = _initial_model(debug_config(tmp_path, shapes_data, stem), 0, tmp_path / "init")
    store = tmp_path / "store"
    summary = run_embed(EmbedConfig(input=str(shapes_data / "images"), out=str(store), encoder=str(init),
                                    patches=True, batch_size=16, device="cpu"))
    assert summary.written == 48 and summary.errors == 0
    cfg = debug_config(tmp_path / "run", shapes_data, stem, f"model.path={init}", "scaling.num_workers=1",
                       "stages=[{name: s, train: [projector], max_steps: 4, batch_size: 4, lr: 3.0e-3, log_every: 1, "
                       f"checkpoint_every: 4, features: {store}}}]")
    run_training(cfg)
    history = _history(tmp_path / "run" / "s")
    assert [h["step"] for h in history] == ["1", "2", "3", "4"]
    # the first batch (the first 4 records in the store's order: no shuffle) from its images, through the model
    # the stage started from
    first = [r["id"] for r in with_stored_features(read_records(cfg.data, image_bytes=False), str(store)).take(4)]
    by_id = {r["id"]: r for r in json.loads((shapes_data / "llava.json").read_text())}
    model, tokenizer = load_model(cfg.model, str(init))
    batch = PixelRayCollator(tokenizer, model.config, cfg.data.max_length)(
        numpy_batch([by_id[i] for i in first], shapes_data))
    with torch.no_grad():
        assert float(history[0]["loss"]) == pytest.approx(model.eval()(**batch).loss.item(), rel=1e-5)
    start = model.state_dict()
    trained = PixelRayForConditionalGeneration.from_pretrained(tmp_path / "run" / "s" / "model").state_dict()
    for name, value in start.items():  # frozen, in eval mode: weights and BatchNorm statistics as they were
        assert torch.equal(trained[name], value) == (not name.startswith("projector.")), name

    # a record whose image the store does not hold: an error before training, naming it
    extra = json.loads((shapes_data / "llava.json").read_text())[:2]
    extra[1] = {**extra[1], "image": "elsewhere/000001.png"}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    with pytest.raises(ValueError, match="1 of 2 records have images that .* does not hold .*elsewhere/000001.png"):
        records = read_records(DataConfig(train=str(tmp_path / "extra.json"), image_root=str(shapes_data)),
                               image_bytes=False)
        with_stored_features(records, str(store))


@pytest.mark.slow
def test_failed_worker_resumes_with_identical_loss(ray_address, shapes_data, tmp_path):
    from pixelray.train_jobs.run import run_training

    common = ("stages=[{name: s, train: [projector, language_model], max_steps: 6, batch_size: 4, lr: 1.0e-3, "
              "log_every: 1, checkpoint_every: 2}]")
    run_training(debug_config(tmp_path / "clean", shapes_data, common))
    marker = tmp_path / "failed-once"
    run_training(debug_config(tmp_path / "fault", shapes_data, common, "fault.fail_at_step=3",
                              f"fault.marker={marker}"))
    assert marker.exists()  # the worker did fail
    clean, faulted = _history(tmp_path / "clean" / "s"), _history(tmp_path / "fault" / "s")
    assert [h["step"] for h in faulted] == ["1", "2", "3", "4", "5", "6"]
    assert [h["loss"] for h in faulted] == [h["loss"] for h in clean]
    # and the same weights, byte for byte: a rerun on this machine, through a failure and a resume
    files = [run / "s" / "model" / "model.safetensors" for run in (tmp_path / "clean", tmp_path / "fault")]
    assert files[0].read_bytes() == files[1].read_bytes()


@pytest.mark.slow
def test_killed_job_goes_on_with_resume(shapes_data, tmp_path):
    """A real `pixelray train` process, killed after its first checkpoint, then resumed."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pixelray.cli", "train", "--config", str(DEBUG), f"output_dir={out}",
            f"model.tokenizer={shapes_data / 'tokenizer'}", f"data.train={shapes_data / 'llava.json'}",
            "stages=[{name: s, train: [projector], max_steps: 40, batch_size: 4, log_every: 1, checkpoint_every: 10}]",
            "scaling.num_workers=1"]
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list((out / "s").glob("checkpoint_*/state.json")) and time.time() < deadline:
            time.sleep(0.5)
        assert list((out / "s").glob("checkpoint_*/state.json")), "no checkpoint within 240 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the killed driver's Ray workers outlive it by a few seconds (and may checkpoint): wait for quiet
    seen, quiet_since = None, time.time()
    while time.time() - quiet_since < 5 and time.time() < deadline + 60:
        now = sorted(p.name for p in (out / "s").glob("checkpoint_*"))
        seen, quiet_since = (now, time.time()) if now != seen else (seen, quiet_since)
        time.sleep(0.5)
    assert not (out / "s" / "model").exists()
    saved, checkpoint = max((json.loads(p.read_text())["step"], p.parent)
                            for p in (out / "s").glob("checkpoint_*/state.json"))
    again = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert saved % 10 == 0 and f"stage s: resuming from {checkpoint}" in again.stderr  # (logged)
    history = _history(out / "s")
    assert [int(h["step"]) for h in history] == list(range(1, 41))
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr


@pytest.mark.slow
def test_hf_vlm_lora(ray_address, shapes_data, tiny_vlm_dirs, tmp_path):
    """LoRA on an off-the-shelf family (tiny LLaVA) through the same recipe; 4-bit needs CUDA."""
    from PIL import Image

    from pixelray.generators import create_generator
    from pixelray.train_jobs.run import run_training

    overrides = [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_vlm_dirs['llava']}",
                 f"data.train={shapes_data / 'llava.json'}", "stages.0.max_steps=8", "stages.0.batch_size=4",
                 "stages.0.lr=3e-3", "stages.0.log_every=1", "deepspeed.precision=fp32", "scaling.cpus_per_worker=1",
                 "scaling.num_workers=2"]
    cfg = load_config(ROOT / "train_jobs" / "configs" / "vlm_lora.yaml", overrides)
    run_training(cfg)
    stage = tmp_path / "run" / "lora"
    history = _history(stage)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    assert (stage / "adapter" / "adapter_config.json").is_file()
    generator = create_generator(str(stage / "model"))
    assert generator.generate([Image.open(shapes_data / "images/000001.png")], "Describe the image.")[0].num_tokens
    quantized = load_config(ROOT / "train_jobs" / "configs" / "vlm_lora.yaml",
                            overrides[1:] + [f"output_dir={tmp_path / 'q'}", "model.quantization=4bit"])
    with pytest.raises(ValueError, match="needs CUDA"):
        run_training(quantized)

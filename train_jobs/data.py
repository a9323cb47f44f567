"""Training data: LLaVA conversations or simple {image, text, prompt} records, streamed with Ray Data,
and the collators that turn a batch of records into model inputs with labels.

    ds = read_records(cfg.data)               # columns: id, images (paths or URIs), conversations, data (bytes)
    collate = make_collator(model, processing, max_length=512)
    batch = collate(rows)                     # input_ids, attention_mask, labels, pixel_values, ...

Labels are -100 everywhere except on the assistant's replies (and their end-of-turn token), so the
loss is on what the model should say, never on the prompt or the image tokens. A record whose
prompt and image tokens leave no room for a reply within `max_length` is an error, never a silently
empty sample; a reply cut by `max_length` trains on what is left.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pixelray.generators import DEFAULT_PROMPT
from pixelray.generators.families import family
from pixelray.images import ImageError, decode_image, image_id
from pixelray.llava import IMAGE_TAG, llava_record
from pixelray.storage import excluded_ids, read_bytes
from pixelray.train_jobs.config import DataConfig

logger = logging.getLogger(__name__)
RECORDS_PER_BLOCK = 1000
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _files(paths: str | list[str]) -> tuple[list[str], str]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    suffixes = {Path(p.rstrip("/")).suffix for p in paths}
    if suffixes <= {".jsonl"}:
        return paths, "jsonl"
    if suffixes <= {".json"}:
        return paths, "json"
    if suffixes <= {".parquet", ""}:
        return paths, "parquet"
    raise ValueError(f"training data must be .json, .jsonl or .parquet files (or Parquet folders), got {paths}")


def read_records(cfg: DataConfig, image_bytes: bool = True) -> ray.data.Dataset:
    """Records in either format -> rows {id, images, conversations, data}: `images` the record's image paths
    (one, or several in the order of their `<image>` tags) resolved against `image_root` (default: the data
    file's folder), `data` the image files' bytes (read in Ray tasks; not with `image_bytes=False`)."""
    paths, kind = _files(cfg.train)
    root = cfg.image_root or posixpath.dirname(paths[0].rstrip("/"))
    convert = {"fmt": cfg.format, "root": root}
    if kind == "parquet":  # (a Parquet column has one type: paths, or lists of them)
        ds = ray.data.read_parquet(paths).map(to_conversation, fn_kwargs=convert)
    else:  # JSON is parsed here, not by Arrow, whose columns cannot hold a path in one record and a list in the next
        read = ray.data.read_text(paths) if kind == "jsonl" else ray.data.read_binary_files(paths)
        ds = read.flat_map(parsed_records, fn_kwargs=convert)
    # a file is one block however many records it holds: blocks of RECORDS_PER_BLOCK let every stage after this
    # one (reading images, checking lengths) run in as many tasks as there are cores
    ds = ds.repartition(target_num_rows_per_block=RECORDS_PER_BLOCK)
    if cfg.exclude:
        ds = ds.map_batches(not_excluded, batch_format="pyarrow", fn_kwargs={"drop": excluded_ids(cfg.exclude)})
    if image_bytes:
        ds = with_image_bytes(ds)
    # Rows keep the files' order, so every run (and every resumed run) splits them the same way.
    ds.context.execution_options.preserve_order = True
    return ds


def with_stored_features(records: ray.data.Dataset, store: str) -> ray.data.Dataset:
    """The records (from `read_records(..., image_bytes=False)`) with their image's patch tokens from a feature
    store in place of image bytes: rows {id, images, conversations, features}; each store row is joined to its
    records by the image id `pixelray embed` gave it. A record whose image the store holds as an error row
    (unreadable) is left out with a warning, as one whose image cannot be read is; a record whose image is not in
    the store at all is an error, as are records of several images. The rows come in the store's order (its
    files' names, then their rows; an image's records in theirs), the same on every read of a store."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pixelray.store import ERRORS, Store

    table = pa.concat_tables(ray.get(records.to_arrow_refs()))
    if several := [i for i, paths in zip(table["id"].to_pylist(), table["images"].to_pylist()) if len(paths) > 1]:
        raise ValueError(f"records {several[:5]} have several images; records train from stored features one "
                         "image a record (train records of several images from their images)")
    keys = pa.array([image_id(posixpath.normpath(p[0])) for p in table["images"].to_pylist()], pa.string())
    table = table.append_column("image_id", keys)
    feature_store, _ = Store.written(store)
    stored = feature_store.dataset("features")
    if stored is None or "patch_features" not in stored.schema.names:
        raise ValueError(f"{store} holds no patch features: write it with `pixelray embed --patches`")
    good = pc.is_in(keys, stored.to_table(columns=["image_id"])["image_id"])
    errors = feature_store.dataset(ERRORS)
    bad = pc.is_in(keys, errors.to_table(columns=["image_id"])["image_id"]) if errors is not None else \
        pa.array([False] * len(keys))
    absent = pc.invert(pc.or_(good, bad))
    if missing := pc.sum(absent).as_py():
        example = table.filter(absent)["images"][0].as_py()[0]
        raise ValueError(f"{missing} of {len(table)} records have images that {store} does not hold (e.g. "
                         f"{example}): embed them into it (`pixelray embed ... --patches --resume`)")
    if dropped := pc.sum(bad).as_py():
        logger.warning("%d of %d records left out: the store holds their images as errors (unreadable)",
                       dropped, len(table))
    kept = table.filter(good).select(["image_id", "id", "images", "conversations"])
    ref = ray.put(kept.append_column("position", pa.array(np.arange(len(kept)))))
    features = ray.data.read_parquet(stored.files, filesystem=feature_store.fs, columns=["image_id", "patch_features"])
    return features.map_batches(_attach_records, batch_format="pyarrow", fn_kwargs={"records": ref})


def _attach_records(batch, records):
    """Store rows -> one row per record of each row's image, with the image's patch tokens as `features`."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    records = ray.get(records)
    rows = pa.table({"image_id": batch["image_id"], "row": pa.array(np.arange(len(batch)))})
    pairs = rows.join(records.select(["image_id", "position"]), "image_id", use_threads=False)
    pairs = pairs.sort_by([("row", "ascending"), ("position", "ascending")])  # (a join's output has no set order)
    features = batch["patch_features"].take(pairs["row"]).combine_chunks()  # [rows] of [patches] of [width]
    shape = (len(features), features.type.list_size, features.type.value_type.list_size)
    tokens = ArrowTensorArray.from_numpy(features.flatten().flatten().to_numpy().reshape(shape))
    return records.select(["id", "images", "conversations"]).take(pairs["position"]).append_column("features", tokens)


def held_out(image: str, fraction: float) -> bool:
    """Whether `validation.fraction` holds this image out of training: by its image id (a hash of its path),
    so the same images every run, and an image's records all on one side (a record of several images goes
    with its first)."""
    return int(image_id(posixpath.normpath(image))[:8], 16) < fraction * 16**8


def split_held_out(ds: ray.data.Dataset, fraction: float) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(training records, validation records) of `ds`, split by `held_out`."""
    import pyarrow as pa

    def side(batch, val: bool):
        return batch.filter(pa.array([held_out(p[0], fraction) == val for p in batch.column("images").to_pylist()]))

    return tuple(ds.map_batches(side, batch_format="pyarrow", fn_kwargs={"val": val}) for val in (False, True))


def parsed_records(row: dict[str, Any], fmt: str, root: str) -> list[dict[str, Any]]:
    """A JSON lines file's line (`text`) or a JSON file's content (`bytes`, an array of records) -> its records
    as `to_conversation` gives them."""
    parsed = json.loads(row["text"] if "text" in row else row["bytes"])
    return [to_conversation(r, fmt, root) for r in (parsed if isinstance(parsed, list) else [parsed])]


def to_conversation(row: dict[str, Any], fmt: str, root: str) -> dict[str, Any]:
    """One record (LLaVA or simple format) -> {id, images, conversations}. `image` is a path, or a list of
    them for a record of several images, each placed by an `<image>` tag in the turns (in order)."""
    if fmt == "auto":
        fmt = "llava" if "conversations" in row else "simple"
    if fmt == "llava":
        turns = [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]
    else:
        if "text" not in row:
            raise ValueError(f"a simple-format record needs image, text (and prompt); got keys {sorted(row)}")
        prompt = row.get("prompt") or DEFAULT_PROMPT
        turns = llava_record("", "", prompt, row["text"])["conversations"]
    images = [row["image"]] if isinstance(row["image"], str) else [str(i) for i in row["image"]]
    images = [posixpath.join(root, i) if root and "://" not in i and not posixpath.isabs(i) else i for i in images]
    tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if tags != len(images) or not images:
        raise ValueError(f"record {row.get('id') or images}: {len(images)} image(s) but {tags} {IMAGE_TAG} tag(s) in "
                         f"its turns; each image needs a tag where it goes")
    return {"id": str(row.get("id") or images[0]), "images": images, "conversations": turns}


def not_excluded(batch, drop: set[str]):
    """The records none of whose images is in `drop`, by the id `pixelray embed` gives an image (of its
    absolute path)."""
    import pyarrow as pa

    keep = [all(image_id(posixpath.normpath(p)) not in drop for p in paths)
            for paths in batch.column("images").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def with_image_bytes(records: ray.data.Dataset) -> ray.data.Dataset:
    """The records with their image files' bytes (`data`), read in Ray tasks."""
    return records.map_batches(read_image_bytes, batch_format="pyarrow")


def read_image_bytes(batch):
    """Add a `data` column with each record's image files' bytes (None for one that cannot be read)."""
    import pyarrow as pa

    def read(uri: str) -> bytes | None:
        try:
            return read_bytes(uri)
        except (OSError, ValueError):
            return None

    data = [[read(uri) for uri in uris] for uris in batch.column("images").to_pylist()]
    return batch.append_column("data", pa.array(data, pa.list_(pa.binary())))


def to_messages(turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """LLaVA turns -> chat messages; `<image>` (and the newline beside it) becomes an image part. A record's
    one image goes before its turn's text, as LLaVA places it and as inference builds its prompts; several
    images each go where their tags are, between the pieces of text."""
    several = sum(t["value"].count(IMAGE_TAG) for t in turns) > 1
    messages = []
    for turn in turns:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown conversation role {turn['from']!r} (expected human/gpt/system)")
        text, content = turn["value"], []
        if IMAGE_TAG in text and not several:
            content.append({"type": "image"})
            text = text.replace(f"{IMAGE_TAG}\n", "").replace(f"\n{IMAGE_TAG}", "").replace(IMAGE_TAG, "")
        elif IMAGE_TAG in text:
            pieces = text.split(IMAGE_TAG)
            for k, piece in enumerate(pieces[:-1]):
                piece = piece.removeprefix("\n") if k else piece
                if piece := piece.removesuffix("\n"):
                    content.append({"type": "text", "text": piece})
                content.append({"type": "image"})
            text = pieces[-1].removeprefix("\n")
        if text or not several or not content:
            content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a training conversation needs at least one reply (a gpt turn)")
    return messages


def reply_spans(template, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
    """The full chat text and, per assistant reply, (text before the reply, text through the reply)."""
    full = template(messages, add_generation_prompt=False, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            before = template(messages[:k], add_generation_prompt=True, tokenize=False)
            through = template(messages[: k + 1], add_generation_prompt=False, tokenize=False)
            if not (full.startswith(before) and full.startswith(through)):
                raise ValueError("the chat template does not render conversations prefix by prefix; "
                                 "labels cannot be placed on the replies")
            spans.append((before, through))
    return full, spans


def _labels(ids: list[int], prefix_lengths: list[tuple[int, int]], max_length: int, record: str) -> list[int]:
    labels = [-100] * len(ids)
    for start, end in prefix_lengths:
        labels[start:end] = ids[start:end]
    if all(x == -100 for x in labels[:max_length]):
        raise ValueError(f"record {record}: prompt and image tokens fill max_length={max_length} "
                         f"({prefix_lengths[0][0]} tokens before the first reply); raise data.max_length")
    return labels[:max_length]


class PixelRayCollator:
    """Records -> inputs of the pixelray model (pixelray.vlm): the tokenizer's chat template, one
    `<image>` token per patch, the open_clip transform of the model's vision tower.

    With `packing`, the batch's records go in order into as few rows of up to max_length tokens as they fill,
    with no padding between them; each row's position ids start again at 0 with each record, and there is no
    attention mask, so that transformers builds a mask in which every record attends only to itself (its
    packed-sequence masks). The loss is the unpacked batch's: padding was never trained on."""

    def __init__(self, tokenizer, config, max_length: int, packing: bool = False):
        from pixelray.encoders import open_clip_preprocess_cfg, open_clip_transform

        self.tokenizer, self.max_length, self.packing = tokenizer, max_length, packing
        self.transform = open_clip_transform(open_clip_preprocess_cfg(config.vision_config, config.vision_preprocess))
        self.image_tokens, self.image_token_id = IMAGE_TAG * config.num_image_tokens, config.image_token_id
        self._known: dict[str, list[int]] = {}  # texts tokenised: the prompts up to a reply repeat from record to
        # record, and a one-turn record's text through its reply is its whole text

    def _ids(self, text: str) -> list[int]:
        if (ids := self._known.get(text)) is None:
            if len(self._known) >= 4096:
                self._known.clear()
            ids = self._known[text] = self.tokenizer(text.replace(IMAGE_TAG, self.image_tokens),
                                                     add_special_tokens=False)["input_ids"]
        return ids

    def encode(self, turns: list[dict[str, str]], record: str = "?") -> tuple[list[int], list[int], int]:
        """(input ids, labels), both cut to max_length, and the uncut length. A cut through an image's tokens (a
        later turn's image) is an error: the model takes every image of a record whole."""
        full, spans = reply_spans(self.tokenizer.apply_chat_template, to_messages(turns))
        ids = self._ids(full)
        labels = _labels(ids, [(len(self._ids(b)), len(self._ids(t))) for b, t in spans], self.max_length, record)
        if ids[self.max_length:].count(self.image_token_id):
            raise ValueError(f"record {record}: max_length={self.max_length} cuts its images' tokens (it is "
                             f"{len(ids)} tokens long); raise data.max_length")
        return ids[: self.max_length], labels, len(ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        stored = "features" in batch  # the vision tower's patch tokens from a feature store (with_stored_features)
        rows = [{"id": str(i), "conversations": c} for i, c in zip(batch["id"], batch["conversations"])] if stored \
            else decoded_rows(batch)
        encoded = [self.encode(list(r["conversations"]), r["id"])[:2] for r in rows]
        packs = self._packs([len(ids) for ids, _ in encoded]) if self.packing else [[i] for i in range(len(rows))]
        width = max(sum(len(encoded[i][0]) for i in pack) for pack in packs)
        out = {"input_ids": torch.full((len(packs), width), self.tokenizer.pad_token_id),
               "labels": torch.full((len(packs), width), -100)}
        out["attention_mask" if not self.packing else "position_ids"] = torch.zeros((len(packs), width),
                                                                                    dtype=torch.long)
        for row, pack in enumerate(packs):
            start = 0
            for ids, labels in (encoded[i] for i in pack):
                out["input_ids"][row, start: start + len(ids)] = torch.tensor(ids)
                out["labels"][row, start: start + len(labels)] = torch.tensor(labels)
                if self.packing:
                    out["position_ids"][row, start: start + len(ids)] = torch.arange(len(ids))
                else:
                    out["attention_mask"][row, : len(ids)] = 1
                start += len(ids)
            if self.packing:  # the padding after a row's records: a sequence of its own
                out["position_ids"][row, start:] = torch.arange(width - start)
        # every image in record order, which is the order of their tokens, row by row
        if stored:
            out["vision_tokens"] = torch.as_tensor(batch["features"])
        else:
            out["pixel_values"] = torch.stack([self.transform(image) for r in rows for image in r["images"]])
        return out

    def _packs(self, lengths: list[int]) -> list[list[int]]:
        """Records (by index, in order) into rows of at most max_length tokens: a row takes the next record
        while it fits."""
        packs, used = [[]], 0
        for i, length in enumerate(lengths):
            if packs[-1] and used + length > self.max_length:
                packs, used = packs + [[]], 0
            packs[-1].append(i)
            used += length
        return packs


class HFCollator:
    """Records -> inputs of an off-the-shelf VLM through its own processor (LLaVA, SmolVLM, Qwen2-VL, each
    taking several images a record); PaliGemma, which has no chat template, gets its processor's `suffix`
    labels, and one image a record."""

    def __init__(self, processor, model_type: str, max_length: int):
        self.processor, self.model_type, self.family = processor, model_type, family(model_type)
        self.max_length = max_length
        self.processor.tokenizer.padding_side = "right"

    def _images(self, row) -> list:
        return [row["images"]] if self.family.nested_images else row["images"]

    def _length(self, text: str, row) -> int:
        return len(self.processor(text=[text], images=self._images(row))["input_ids"][0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = decoded_rows(batch)
        images = [im for r in rows for im in self._images(r)]
        if not self.family.chat_template:  # PaliGemma: its processor makes the labels from `suffix`
            if several := [r["id"] for r in rows if len(r["images"]) > 1]:
                raise ValueError(f"records {several[:5]} have several images; {self.model_type} takes one a record")
            messages = [to_messages(list(r["conversations"])) for r in rows]
            prompts = [IMAGE_TAG + m[0]["content"][-1]["text"] for m in messages]
            answers = [m[1]["content"][-1]["text"] for m in messages]
            out = self.processor(text=prompts, images=images, suffix=answers, padding=True, return_tensors="pt")
            return dict(out)
        texts, spans = [], []
        for r in rows:
            full, reply = reply_spans(self.processor.apply_chat_template, to_messages(list(r["conversations"])))
            texts.append(full)
            spans.append([(self._length(b, r), self._length(t, r)) for b, t in reply])
        out = dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))
        labels = torch.full_like(out["input_ids"], -100)
        for i, (r, s) in enumerate(zip(rows, spans)):
            n = int(out["attention_mask"][i].sum())
            labels[i, :n] = torch.tensor(_labels(out["input_ids"][i, :n].tolist(), s, n, r["id"]))
        out["labels"] = labels
        if out["input_ids"].shape[1] > self.max_length:
            raise ValueError(f"a batch is {out['input_ids'].shape[1]} tokens long, over max_length={self.max_length}; "
                             "raise data.max_length (image tokens cannot be cut)")
        return out


def decoded_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Rows of a numpy batch with its decoded RGB `images`; a record with an unreadable image is left out,
    with one warning per batch that names them."""
    rows, skipped = [], []
    for i in range(len(batch["id"])):
        images = []
        for path, data in zip(batch["images"][i], batch["data"][i], strict=True):
            try:
                if data is None:
                    raise ImageError("the image file could not be read", code="not_found")
                images.append(decode_image(bytes(data)))
            except ImageError as e:
                skipped.append(f"{batch['id'][i]} ({path}: {e.message})")
                break
        else:
            rows.append({"id": str(batch["id"][i]), "images": images, "conversations": batch["conversations"][i]})
    if skipped:
        logger.warning("skipped %d of %d records, their images unreadable: %s", len(skipped), len(batch["id"]),
                       "; ".join(skipped))
    if not rows:
        raise ValueError(f"no readable image in a batch of {len(batch['id'])} records")
    return rows


def make_collator(model, processing, max_length: int, packing: bool = False):
    config = model.config
    if config.model_type == "pixelray":
        return PixelRayCollator(processing, config, max_length, packing)
    if packing:
        raise ValueError(f"data.packing is for the pixelray family; {config.model_type} models are trained unpacked")
    return HFCollator(processing, config.model_type, max_length)


def check_lengths(ds: ray.data.Dataset, collator: PixelRayCollator) -> dict[str, int]:
    """Encode every record's text (no images needed: the image token count is fixed) and fail before
    training when one leaves no room for its reply. Returns {records, longest, truncated}."""
    def lengths(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = [collator.encode(list(c), str(i)) for c, i in zip(batch["conversations"], batch["id"])]
        return {"length": np.array([e[2] for e in encoded]), "kept": np.array([len(e[0]) for e in encoded])}

    stats = ds.select_columns(["id", "conversations"]).map_batches(lengths, batch_format="numpy").to_pandas()
    return {"records": len(stats), "longest": int(stats["length"].max()),
            "truncated": int((stats["length"] > stats["kept"]).sum())}

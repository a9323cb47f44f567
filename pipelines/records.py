"""Caption and VQA stores -> LLaVA training records, so that caption -> review -> train is three commands:

    pixelray caption photos/ --out caps --model qwen2-vl-2b          # or --questions q.jsonl: answers
    pixelray show caps --out review.html                             # look at them
    pixelray records caps --out caps.json [--where finish_reason=stop] [--exclude caps/dedup.parquet]
    pixelray train --config train_jobs/configs/small_scale.yaml data.train=caps.json

Run as:
    pixelray records STORE [STORE ...] --out FILE.json|FILE.jsonl [--where COLUMN=VALUE ...] [--exclude TABLE]
                     [--keep-cut]

Each stored reply becomes one record in LLaVA's format, the one `pixelray train` reads (train_jobs/data.py):
{"id", "image": the image's path as stored, "conversations": [{"from": "human", "value": "<image>\\nPROMPT"},
{"from": "gpt", "value": REPLY}]}, where PROMPT is the caption's prompt or the question. Error rows are not
training data and are never in the table read. Left out, and counted: replies cut at max_new_tokens
(finish_reason "length", unless --keep-cut), empty replies, images in the `exclude` table (a `pixelray dedup`
table, or a store holding one: STORE/dedup.parquet), and rows `where` leaves out (`pixelray show`'s
conditions). The file is written whole or not at all; its records are in store order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from pixelray.llava import llava_record
from pixelray.storage import excluded_ids, split_uri
from pixelray.store import Store, atomic_output, where_mask

REPLY_COLUMNS = {"caption": "prompt", "answer": "question"}  # a store's reply column -> the column that asked


@dataclass
class RecordsSummary:
    out: str
    written: int
    cut: int = 0
    empty: int = 0
    excluded: int = 0
    filtered: int = 0

    def __str__(self) -> str:
        left = [f"{n} {what}" for n, what in ((self.cut, "cut at max_new_tokens (--keep-cut keeps them)"),
                                              (self.empty, "empty"), (self.excluded, "excluded"),
                                              (self.filtered, "left out by --where")) if n]
        return (f"pixelray records: wrote {self.written} records to {self.out}"
                + (f"; left out: {', '.join(left)}" if left else ""))


def store_table(uri: str) -> tuple[pa.Table, str, str]:
    """A caption or VQA store's good rows, with the names of its reply column and of its prompt column."""
    store, manifest = Store.written(uri)
    if manifest.get("job") != "caption":
        raise ValueError(f"{uri} holds {manifest.get('job', 'no')} output, not captions or answers: records are "
                         "made from `pixelray caption` stores")
    dataset = store.dataset(store.table)
    if dataset is None:
        raise ValueError(f"{uri} has no {store.table} yet")
    reply = next(c for c in REPLY_COLUMNS if c in dataset.schema.names)
    return dataset.to_table(), reply, REPLY_COLUMNS[reply]


def write_records(stores: list[str], out: str, where: list[str] | tuple[str, ...] = (), exclude: str | None = None,
                  keep_cut: bool = False) -> RecordsSummary:
    if not out.endswith((".json", ".jsonl")):
        raise ValueError(f"--out {out!r}: records are written as .json (a list, as LLaVA's) or .jsonl")
    drop = excluded_ids(exclude) if exclude else set()
    records, summary = [], RecordsSummary(out=out, written=0)
    for uri in stores:
        table, reply, prompt = store_table(uri)
        if where:
            kept = table.filter(where_mask(table, list(where)))
            summary.filtered += table.num_rows - kept.num_rows
            table = kept
        for row in table.to_pylist():
            if row["image_id"] in drop:
                summary.excluded += 1
            elif not (row[reply] or "").strip():
                summary.empty += 1
            elif row.get("finish_reason") == "length" and not keep_cut:
                summary.cut += 1
            else:
                records.append(llava_record(row.get("item_id") or row["image_id"], row["path"], row[prompt],
                                            row[reply]))
    if not records:
        raise ValueError(f"no records: every row of {', '.join(stores)} was left out ({summary})")
    data = "".join(json.dumps(r) + "\n" for r in records) if out.endswith(".jsonl") else json.dumps(records, indent=1)
    fs, path, _ = split_uri(out)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with atomic_output(fs, path) as f:
        f.write(data.encode())
    summary.written = len(records)
    return summary

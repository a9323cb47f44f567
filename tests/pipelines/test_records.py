"""`pixelray records`: caption and VQA stores written by real caption jobs (the bundled shapes-demo model) become
LLaVA records, which a real training run reads: caption -> records -> train."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.pipelines.records import write_records
from pixelray.shapes import caption_correct

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "examples" / "shapes"
CAPTIONS = {Path(row["image"]).name: row
            for row in map(json.loads, (SHAPES / "captions.jsonl").read_text().splitlines())}
QUESTIONS = [json.loads(line) for line in (SHAPES / "questions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stores(ray_address, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("stores")
    run_caption(CaptionConfig(input=str(SHAPES / "images"), out=str(out / "caps"), model="shapes-demo"))
    run_caption(CaptionConfig(questions=str(SHAPES / "questions.jsonl"), out=str(out / "vqa"), model="shapes-demo"))
    # every caption cut short: the shortest has 6 tokens
    run_caption(CaptionConfig(input=str(SHAPES / "images"), out=str(out / "cut"), model="shapes-demo",
                              generation={"max_new_tokens": 4}))
    return out / "caps", out / "vqa", out / "cut"


def test_captions_and_answers_become_records(stores, tmp_path):
    caps, vqa, cut = stores
    summary = write_records([str(caps), str(vqa)], str(tmp_path / "records.json"))
    records = json.loads((tmp_path / "records.json").read_text())
    assert summary.written == len(records) == len(CAPTIONS) + len(QUESTIONS)
    captions, answers = records[:len(CAPTIONS)], records[len(CAPTIONS):]
    for r in captions:  # the trained model's captions, as stored, under the prompt they answered
        human, gpt = r["conversations"]
        assert human == {"from": "human", "value": "<image>\nDescribe the image."} and Path(r["image"]).is_file()
        assert caption_correct(gpt["value"], CAPTIONS[Path(r["image"]).name]["shapes"])
    stored = {(row["path"], row["question"]): row["answer"] for row in pq.read_table(vqa / "captions").to_pylist()}
    assert {(r["image"], r["conversations"][0]["value"].removeprefix("<image>\n")): r["conversations"][1]["value"]
            for r in answers} == stored
    assert len({r["id"] for r in records}) == len(records)  # image ids for captions, item ids for answers

    # what is left out, and said so
    lines = write_records([str(caps)], str(tmp_path / "two.jsonl"), where=["caption~ star"])
    kept = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert lines.written == len(kept) > 0 and all(" star" in r["conversations"][1]["value"] for r in kept)
    assert lines.filtered == len(CAPTIONS) - len(kept) and "left out by --where" in str(lines)
    with pytest.raises(ValueError, match=f"no records.*{len(CAPTIONS)} cut at max_new_tokens"):
        write_records([str(cut)], str(tmp_path / "cut.json"))
    assert write_records([str(cut)], str(tmp_path / "cut.json"), keep_cut=True).written == len(CAPTIONS)
    dropped = sorted(r["id"] for r in captions)[:2]  # a dedup table's drops, and one image it keeps
    pq.write_table(pa.table({"image_id": [*dropped, captions[-1]["id"]], "keep": [False, False, True]}),
                   tmp_path / "dedup.parquet")
    deduped = write_records([str(caps)], str(tmp_path / "deduped.json"), exclude=str(tmp_path / "dedup.parquet"))
    assert (deduped.written, deduped.excluded) == (len(CAPTIONS) - 2, 2)
    assert not {r["id"] for r in json.loads((tmp_path / "deduped.json").read_text())} & set(dropped)


def test_records_train_a_model(stores, tmp_path):
    from pixelray.train_jobs.config import load_config
    from pixelray.train_jobs.run import run_training

    caps, vqa, _ = stores
    write_records([str(caps), str(vqa)], str(tmp_path / "records.json"))
    cfg = load_config(ROOT / "train_jobs/configs/debug.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.tokenizer={ROOT / 'pixelray/models/shapes-demo'}",
        f"data.train={tmp_path / 'records.json'}", "scaling.num_workers=1",
        "stages=[{name: stage1, train: [projector], max_steps: 2, batch_size: 4, checkpoint_every: 2}]"])
    summary = run_training(cfg)
    assert summary["stages"]["stage1"]["records"] == len(CAPTIONS) + len(QUESTIONS)
    assert (tmp_path / "run/stage1/model/config.json").is_file()


def test_bad_records_requests_are_clear_errors(stores, tmp_path, capsys):
    from pixelray.cli import main

    caps = stores[0]
    assert main(["records", str(caps), "--out", str(tmp_path / "ok.json")]) == 0
    assert f"wrote {len(CAPTIONS)} records to {tmp_path / 'ok.json'}" in capsys.readouterr().out
    assert main(["records", str(caps), "--out", str(tmp_path / "r.json"), "--where", "caption=none"]) == 2
    assert "pixelray records: error: no records" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\.json .* or \.jsonl"):
        write_records([str(caps)], str(tmp_path / "records.txt"))
    with pytest.raises(ValueError, match="not a pixelray store"):
        write_records([str(tmp_path)], str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="no records"):
        write_records([str(caps)], str(tmp_path / "r.json"), where=["caption=nothing like this"])
    with pytest.raises(ValueError, match="use COLUMN=VALUE"):
        write_records([str(caps)], str(tmp_path / "r.json"), where=["nosuchcolumn=1"])

"""Run records and `pixelray inspect`: each run of a job leaves its figures in the store, and the report shows
them beside the store's settings, counts, errors by type, schema and rows."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.pipelines.inspect import inspect_store
from pixelray.store import Store
from pixelray.testing.images import write_folder


def test_runs_are_recorded_and_inspected(ray_address, tiny_clip, tmp_path):
    folder = tmp_path / "imgs"
    wrote = write_folder(folder, 4)
    out = tmp_path / "store"
    settings = dict(input=str(folder), out=str(out), encoder=str(tiny_clip), batch_size=4, address=ray_address)
    first = run_embed(EmbedConfig(**settings))
    (folder / "late.png").write_bytes(wrote["good"][1].read_bytes())  # an image added since: the resume's work
    second = run_embed(EmbedConfig(**settings, resume=True))

    runs = Store(str(out), "features").run_records()
    errors = Counter(pq.read_table(out / "errors")["error_type"].to_pylist())
    assert [(r["written"], r["errors"], r["previously_stored"]) for r in runs] == [
        (first.written, first.errors, 0), (1, 0, first.written + first.errors)]
    assert runs[0]["errors_by_type"] == dict(errors) and sum(errors.values()) == len(wrote["errors"]) > 1
    assert runs[0]["job"] == "embed" and runs[0]["settings"]["encoder_source"].endswith(str(tiny_clip))
    assert runs[0]["started"] <= runs[0]["ended"] <= runs[1]["started"] and second.written == 1

    report = inspect_store(str(out), rows=2)
    assert f"features/  {first.written + 1} rows" in report and "runs (2):" in report
    assert "errors by type: " in report and all(f"{kind} {n}" in report for kind, n in errors.items())
    assert "  embedding: fixed_size_list<" in report and "embedding=[" in report
    assert report.count("image_id=") == 2
    with pytest.raises(ValueError, match="not a pixelray store"):
        inspect_store(str(folder))

    run_embed(EmbedConfig(**settings, overwrite=True))  # a new store: its runs start again
    assert len(Store(str(out), "features").run_records()) == 1

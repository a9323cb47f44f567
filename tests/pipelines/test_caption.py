"""`pixelray caption` end to end: captions, VQA from a questions file, errors, resume, the CLI."""

from __future__ import annotations

import json
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixelray.generators import GenerationConfig, create_generator
from pixelray.images import decode_image, image_id
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.testing import wait_until
from pixelray.testing.images import write_folder
from pixelray.testing.prometheus import metrics_port, scrape, total

PIXELRAY = str(Path(sys.executable).parent / "pixelray")


def test_captions_match_direct_generation_and_errors_are_recorded(ray_address, tiny_llava, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=5)
    cfg = CaptionConfig(input=str(tmp_path / "imgs"), out=str(tmp_path / "c"), model=str(tiny_llava),
                        prompt="Describe the image.", generation={"max_new_tokens": 5}, batch_size=2)
    res = run_caption(cfg)
    assert (res.written, res.errors) == (5, len(info["errors"]))
    table = pq.read_table(tmp_path / "c/captions")
    for col, typ in (("caption", pa.string()), ("num_tokens", pa.int32()), ("prompt", pa.string()),
                     ("max_new_tokens", pa.int32()), ("temperature", pa.float32()), ("image_id", pa.string())):
        assert table.schema.field(col).type == typ
    rows = table.to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in info["good"])
    assert {r["prompt"] for r in rows} == {"Describe the image."} and {r["max_new_tokens"] for r in rows} == {5}
    # each row holds the caption of its own image (batched in the job, one at a time here)
    gen = create_generator(str(tiny_llava), device="cpu")
    for r in rows:
        expected = gen.generate([decode_image(Path(r["path"]).read_bytes())], "Describe the image.",
                                GenerationConfig(max_new_tokens=5))[0]
        assert (r["caption"], r["num_tokens"]) == (expected.text, expected.num_tokens)
    errors = pq.read_table(tmp_path / "c/errors").to_pylist()
    assert {Path(e["path"]).name: e["error_type"] for e in errors} == info["errors"]

    # Prometheus sees the job too: its items and error rows by type (pixelray.telemetry, Ray's metrics endpoint)
    def counted():
        samples = scrape(metrics_port())
        items = total(samples, "ray_pixelray_job_items_total", job="caption", store=cfg.out)
        kinds = {k: total(samples, "ray_pixelray_job_errors_total", store=cfg.out, error_type=k)
                 for k in set(info["errors"].values())}
        return items == 5 + len(info["errors"]) and kinds == Counter(info["errors"].values())

    wait_until(counted, 60, "the job's series")

    again = run_caption(cfg.model_copy(update={"resume": True}))
    assert (again.written, again.errors, again.previously_stored) == (0, 0, 5 + len(info["errors"]))
    with pytest.raises(ValueError, match="prompt: stored"):
        run_caption(cfg.model_copy(update={"resume": True, "prompt": "Something else"}))


def test_vqa_questions_file_one_answer_per_row(ray_address, tiny_vlm_dirs, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=2, bad=False)
    a, b = (p.name for p in info["good"])
    rows = [{"image": f"imgs/{a}", "question": "What color is it?"},
            {"image": f"imgs/{a}", "question": "How many cars?"},
            {"image": f"imgs/{b}", "question": "What color is it?"},
            {"image": "imgs/missing.jpg", "question": "Anything?"}]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = CaptionConfig(questions=str(qfile), out=str(tmp_path / "v"), model=str(tiny_vlm_dirs["smolvlm"]),
                        generation={"max_new_tokens": 4}, batch_size=3)
    res = run_caption(cfg)
    assert (res.written, res.errors) == (3, 1)
    answers = pq.read_table(tmp_path / "v/captions")
    assert {"item_id", "question", "answer"} <= set(answers.schema.names) and "caption" not in answers.schema.names
    got = sorted((Path(r["path"]).name, r["question"]) for r in answers.to_pylist())
    assert got == sorted((Path(r["image"]).name, r["question"]) for r in rows[:3])
    assert len(set(answers["item_id"].to_pylist())) == 3
    err = pq.read_table(tmp_path / "v/errors").to_pylist()[0]
    assert err["question"] == "Anything?" and err["error_type"] == "unreadable"

    qfile.write_text(qfile.read_text() + "\n" + json.dumps({"image": f"imgs/{b}", "question": "How many cars?"}))
    again = run_caption(cfg.model_copy(update={"resume": True}))
    assert (again.written, again.errors, again.previously_stored) == (1, 0, 4)

    # a dedup table that keeps b of the group {a, b}: a's questions are left out, the others answered
    ids = [image_id(str(tmp_path / "imgs" / name)) for name in (a, b)]
    pq.write_table(pa.table({"image_id": ids, "group": [0, 0], "keep": [False, True]}), tmp_path / "dedup.parquet")
    res = run_caption(cfg.model_copy(update={"out": str(tmp_path / "v2"), "exclude": str(tmp_path / "dedup.parquet")}))
    assert (res.written, res.errors, res.excluded) == (2, 1, 2)
    assert {Path(p).name for p in pq.read_table(tmp_path / "v2/captions")["path"].to_pylist()} == {b}


def test_questions_file_errors(tmp_path):
    from pixelray.pipelines.sources import resolve_questions

    (tmp_path / "q.jsonl").write_text(json.dumps({"img": "a.jpg", "q": "?"}))
    with pytest.raises(ValueError, match="needs columns 'image' and 'question'"):
        resolve_questions(str(tmp_path / "q.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON lines or Parquet"):
        resolve_questions(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="--question or --questions, not both"):
        CaptionConfig(input="x", out="y", question="a", questions="b")


def test_cli_question_with_qwen2_vl(ray_address, tiny_vlm_dirs, tmp_path):
    write_folder(tmp_path / "imgs", n_good=3, bad=False)
    proc = subprocess.run(
        [PIXELRAY, "caption", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--model",
         str(tiny_vlm_dirs["qwen2_vl"]), "--question", "What is it?", "--max-tokens", "3", "--address", ray_address],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 answers, 0 errors" in proc.stdout
    assert set(pq.read_table(tmp_path / "o/captions")["question"].to_pylist()) == {"What is it?"}


def test_missing_model_fails_before_reading(ray_address, tmp_path, capsys):
    from pixelray.cli import main

    write_folder(tmp_path / "imgs", n_good=1, bad=False)
    assert main(["caption", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--model", "smolvlm"]) == 2
    assert "huggingface-cli download HuggingFaceTB/SmolVLM-Instruct" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,prompt", [("paligemma", "caption en"), ("pixelray", "Describe the image.")])
def test_other_families_end_to_end(ray_address, tiny_vlm_dirs, tmp_path, family, prompt):
    info = write_folder(tmp_path / "imgs", n_good=3, bad=False)
    res = run_caption(CaptionConfig(input=str(tmp_path / "imgs"), out=str(tmp_path / "p"),
                                    model=str(tiny_vlm_dirs[family]), prompt=prompt,
                                    generation={"max_new_tokens": 3}))
    rows = pq.read_table(tmp_path / "p/captions").to_pylist()
    assert res.written == 3 and sorted(r["path"] for r in rows) == sorted(str(p) for p in info["good"])
    assert all(r["prompt"] == prompt and r["num_tokens"] <= 3 for r in rows)

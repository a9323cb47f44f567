"""Score a `pixelray caption` output against references: BLEU-4, CIDEr, ROUGE-L for captions, VQA
accuracy for answers, and for the shapes demo the caption attribute accuracy.

Run as:
    pixelray eval runs/out --references data/captions.jsonl      # or a questions file with answers
    pixelray eval --shapes 500 --model shapes-demo --out runs/shapes-eval

References are JSON lines: {"image", "captions": [...], "shapes"?: [...]} for captions,
{"image", "question", "answers": [...]} for VQA; images are paths relative to the references file.
Predictions are matched to references by image path (and question).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixelray.metrics import caption_scores, vqa_accuracy
from pixelray.store import Store
from pixelray.shapes import HELD_OUT_SEED, caption_correct, write_dataset


def _key(path: str, base: Path | None = None) -> str:
    if "://" in path:
        return path
    p = Path(path)
    return str((base / p if base is not None and not p.is_absolute() else p).resolve())


def read_predictions(out: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """("captions" or "answers", rows) of a `pixelray caption` output directory."""
    ds = Store(str(out), "captions").dataset("captions")
    if ds is None:
        raise ValueError(f"{out} holds no captions/*.parquet: give the --out directory of `pixelray caption`")
    table = ds.to_table()
    return ("answers" if "answer" in table.column_names else "captions"), table.to_pylist()


def read_references(path: str | Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"references file {path} is empty")
    return rows


def score(predictions: str | Path, references: str | Path) -> dict[str, Any]:
    """Metrics of one caption or VQA output against its references file."""
    kind, preds = read_predictions(predictions)
    refs, base = read_references(references), Path(references).parent
    if kind == "captions":
        if "captions" not in refs[0]:
            raise ValueError(f"{references}: caption references need a 'captions' list per image")
        index = {_key(r["image"], base): r for r in refs}
        pairs = [(index[_key(p["path"])], p["caption"]) for p in preds if _key(p["path"]) in index]
    else:
        if "answers" not in refs[0]:
            raise ValueError(f"{references}: VQA references need 'question' and an 'answers' list per row")
        index = {(_key(r["image"], base), r["question"]): r for r in refs}
        pairs = [(index[k], p["answer"]) for p in preds if (k := (_key(p["path"]), p["question"])) in index]
    if not pairs:
        raise ValueError(f"no prediction in {predictions} matches a reference in {references} (by image path)")
    result: dict[str, Any] = {"kind": kind, "references": len(refs), "scored": len(pairs),
                              "missing": len(refs) - len(pairs)}
    if kind == "captions":
        scores = caption_scores({str(i): r["captions"] for i, (r, _) in enumerate(pairs)},
                                {str(i): text for i, (_, text) in enumerate(pairs)})
        result.update({k: scores[k] for k in ("BLEU-4", "CIDEr", "ROUGE-L")})
        if all("shapes" in r for r, _ in pairs):
            result["attribute_accuracy"] = sum(caption_correct(t, r["shapes"]) for r, t in pairs) / len(pairs)
    else:
        result["vqa_accuracy"] = vqa_accuracy({str(i): a for i, (_, a) in enumerate(pairs)},
                                              {str(i): r["answers"] for i, (r, _) in enumerate(pairs)})
    return result


def run_shapes_eval(num: int, model: str, out: str | Path, **caption_options) -> dict[str, Any]:
    """Generate `num` held-out shapes images, caption them and answer their questions with `model`,
    and score both. Writes OUT/data, OUT/captions, OUT/answers and OUT/scores.json."""
    from pixelray.pipelines.caption import CaptionConfig, run_caption

    out = Path(out)
    data = write_dataset(out / "data", num, seed=HELD_OUT_SEED)
    common = {"model": model, "overwrite": True, **caption_options}
    run_caption(CaptionConfig(input=str(data / "images"), out=str(out / "captions"), **common))
    run_caption(CaptionConfig(questions=str(data / "questions.jsonl"), out=str(out / "answers"), **common))
    scores = {"model": model, "images": num, "captions": score(out / "captions", data / "captions.jsonl"),
              "answers": score(out / "answers", data / "questions.jsonl")}
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores

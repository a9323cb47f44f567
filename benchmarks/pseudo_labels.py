"""Pseudo-labelling round trip: a trained model captions and answers unseen images, its replies become training
records (`pixelray records`), and a fresh model trained on them is scored on held-out images, beside the same
model trained on the true labels of the same images with the same budget.

Run as (from the repository root; the recipe's tokenizer comes from `pixelray shapes ... --tokenizer`):
    pixelray shapes --out runs/shapes/data --num 20000 --tokenizer
    python benchmarks/pseudo_labels.py [--images 8000] [--scale 0.25] [--out runs/bench-pseudo]

1. `pixelray shapes` draws IMAGES new images (a seed the bundled model never saw); only their images are used
   for training, their true labels only for the comparison arm and for scoring the teacher.
2. The bundled shapes-demo model (the teacher) captions them and answers every question of theirs
   (`pixelray caption`, a caption store and a VQA store); its accuracy on them is printed.
3. `pixelray records` turns both stores into LLaVA records; the true labels make records of the same form
   (the same images, prompts and questions, the true replies).
4. The shapes recipe (train_jobs/configs/shapes.yaml, its max_steps times SCALE, no validation) trains a fresh
   model on each record set, and `pixelray eval --shapes 500` scores both on held-out images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train_jobs" / "configs" / "shapes.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--scale", type=float, default=0.25, help="each stage's max_steps times this")
    parser.add_argument("--eval", type=int, default=500, help="held-out images scored")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pseudo"))
    args = parser.parse_args()

    from pixelray.llava import llava_record
    from pixelray.pipelines.caption import CaptionConfig, run_caption
    from pixelray.pipelines.evaluate import run_shapes_eval, score
    from pixelray.pipelines.records import write_records
    from pixelray.runtime import init_ray
    from pixelray.shapes import write_dataset
    from pixelray.train_jobs.config import load_config
    from pixelray.train_jobs.run import run_training

    init_ray()
    started = time.perf_counter()
    shutil.rmtree(args.out / "unseen", ignore_errors=True)  # (a folder of another size would be captioned whole)
    data = write_dataset(args.out / "unseen", args.images, seed=7)  # 1.
    teacher = {"model": "shapes-demo", "overwrite": True}  # 2.
    run_caption(CaptionConfig(input=str(data / "images"), out=str(args.out / "captions"), **teacher))
    run_caption(CaptionConfig(questions=str(data / "questions.jsonl"), out=str(args.out / "answers"), **teacher))
    labelled_s = time.perf_counter() - started
    teacher_scores = {"captions": score(args.out / "captions", data / "captions.jsonl"),
                      "answers": score(args.out / "answers", data / "questions.jsonl")}
    print(f"teacher on the {args.images} unseen images ({labelled_s:.0f} s to draw and label them): caption "
          f"accuracy {teacher_scores['captions']['attribute_accuracy']:.3f}, VQA accuracy "
          f"{teacher_scores['answers']['vqa_accuracy']:.3f}", flush=True)

    pseudo = args.out / "pseudo.json"  # 3.
    summary = write_records([str(args.out / "captions"), str(args.out / "answers")], str(pseudo))
    print(summary, flush=True)
    prompt = json.loads(pseudo.read_text())[0]["conversations"][0]["value"].removeprefix("<image>\n")
    captions = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines()]
    truth = [llava_record(Path(r["image"]).stem, str((data / r["image"]).resolve()), prompt, r["captions"][0])
             for r in captions]
    truth += [llava_record(f"{Path(r['image']).stem}-{i}", str((data / r["image"]).resolve()), r["question"],
                           r["answers"][0]) for i, r in enumerate(questions)]
    gold = args.out / "gold.json"
    gold.write_text(json.dumps(truth))

    recipe = load_config(RECIPE)
    results = {"images": args.images, "scale": args.scale, "teacher": teacher_scores, "records": summary.written}
    for arm, records in (("pseudo-labels", pseudo), ("true labels", gold)):  # 4.
        stages = [s.model_copy(update={"max_steps": max(1, round(s.max_steps * args.scale)), "data": None,
                                       "checkpoint_every": max(1, round(s.max_steps * args.scale))})
                  for s in recipe.stages]
        out = args.out / arm.replace(" ", "-")
        cfg = recipe.model_copy(update={"output_dir": str(out), "validation": None, "stages": stages,
                                        "data": recipe.data.model_copy(update={"train": str(records)})})
        started = time.perf_counter()
        run_training(cfg, overwrite=True)
        trained_s = time.perf_counter() - started
        model = str(out / stages[-1].name / "model")
        scores = run_shapes_eval(args.eval, model, out / "eval")
        results[arm] = {"train_s": trained_s, "caption_accuracy": scores["captions"]["attribute_accuracy"],
                        "vqa_accuracy": scores["answers"]["vqa_accuracy"], "CIDEr": scores["captions"]["CIDEr"]}
        print(f"{arm}: trained in {trained_s:.0f} s; held-out caption accuracy "
              f"{results[arm]['caption_accuracy']:.3f}, VQA accuracy {results[arm]['vqa_accuracy']:.3f}, "
              f"CIDEr {results[arm]['CIDEr']:.2f}", flush=True)
    (args.out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

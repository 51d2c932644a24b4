"""Command line: parse, build a config, call the library. Nothing else lives here.

`toolkit train` flags are generated from the config dataclasses (`toolkit.training.config.leaf_fields`),
one flag per field; `--config FILE` supplies values beneath them. Every `ToolkitError` becomes one
line on stderr and a non-zero exit code (`toolkit.core.errors.exit_code`).

Each command imports its module when it runs: `toolkit predict model.onnx` must start without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.apps.serving.config import DEFAULTS as SERVE_DEFAULTS
from toolkit.artifacts import formats
from toolkit.artifacts.backends import DEFAULT_MAX_BATCH, DEFAULT_PROVIDER, PROVIDERS
from toolkit.core.errors import ToolkitError, exit_code
from toolkit.core.memory import keep_freed_memory
from toolkit.training.config import (DATA_SOURCES, HELD_OUT_SPLITS, RECIPES, TTA_LEVELS, TrainConfig, build_train_config,
                                     field_type, flag_name, leaf_fields, read_config_file)
from toolkit.training.status import RunStatus, describe_status, status_field

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}
_DATA_OVERRIDES = ("data", "data_dir", "cache_dir")  # flags of evaluate/verify that replace the run's data config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, and --config; defaults are SUPPRESSed so a file and recipes can fill the rest."""
    for _, f in leaf_fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        base, _ = field_type(f)
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
        parser.add_argument(flag_name(f.name), help=f"{f.metadata.get('help', '')} [{shown}]", **kwargs)
    parser.add_argument("--config", dest="config_file", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or JSON file of config values (a run's config.json works as it is); flags override "
                             "it, it overrides the recipe. Its resume and overwrite are ignored: pass them as flags")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=DATA_SOURCES, default=argparse.SUPPRESS, help="dataset source (default: the run's)")
    parser.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS, help="dataset folder (default: the run's)")
    parser.add_argument("--cache-dir", dest="cache_dir", default=argparse.SUPPRESS, help="decoded-split cache folder")


def _formats_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", default=",".join(formats.EXPORTABLE),
                        help=f"comma-separated subset of {','.join(formats.EXPORTABLE)}")


def _tolerance_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    scaled = (f"the larger of {formats.LOGIT_ATOL:g} and {formats.NOISE_FACTOR:g}× the model's own fp32 rounding "
              "noise, measured; given, either flag makes the bound fixed: atol + rtol·|eager logit|")
    parser.add_argument("--atol", type=float, default=None,
                        help=f"{prefix}absolute logit tolerance of fp32 formats (default {scaled}; "
                             "fp16 and int8 files are held to eager's accuracy instead)")
    parser.add_argument("--rtol", type=float, default=None,
                        help=f"{prefix}relative logit tolerance of fp32 formats (default {formats.LOGIT_RTOL:g})")


def _tta_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--tta", choices=TTA_LEVELS, default=None,
                        help=f"test-time augmentation: logits averaged over views of each image, flip (2 views) or "
                             f"flip-translate (6); {default}")


def _model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the model of the weights (default: the one they name); needed for your own model, "
                             "package.module:factory, whose module is imported only when named here")


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per runtime (intra-op threads of torch and of ONNX Runtime)")


def _provider_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=PROVIDERS, default=DEFAULT_PROVIDER,
                        help="where ONNX Runtime runs .onnx files: auto (CUDA when this onnxruntime build has it, "
                             "else the CPU), cpu, cuda, tensorrt; torch formats run on the CPU "
                             f"(default {DEFAULT_PROVIDER})")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (run under `accelerate launch` for several processes)")
    add_config_flags(p)
    p.set_defaults(func=_cmd_train)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train, evaluate, export all formats, verify them, draw pictures, write report.md")
    add_config_flags(p)
    p.add_argument("--export-dir", dest="export_dir", type=Path, default=None,
                   help="export folder (default: exports/<run folder name>)")
    _formats_flag(p)
    _tolerance_flags(p, "verification: ")
    p.set_defaults(func=_cmd_run)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="how a run's latest start ended, or that it is running (runs/NAME/status.json)")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (runs/<name>)")
    p.add_argument("--field", choices=[f.name for f in dataclasses.fields(RunStatus)], default=None,
                   help="print only this field of status.json (for scripts: --field state)")
    p.set_defaults(func=_cmd_status)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild a run's report.md and pictures from its files")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (runs/<name>)")
    p.set_defaults(func=_cmd_report)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="overall and per-class accuracy of a run's final weights")
    p.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>)")
    _data_flags(p)
    p.add_argument("--split", choices=HELD_OUT_SPLITS, default=HELD_OUT_SPLITS[0])
    p.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")
    _tta_flag(p, "default: the run's --tta")
    _model_flag(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write TorchScript, ONNX (fp32, fp16, int8) and torch.export files (+ manifest) "
                                      "from a run")
    p.add_argument("--run", type=Path, required=True, help="run folder (runs/<name>)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: exports/<run folder name>)")
    _formats_flag(p)
    p.add_argument("--checkpoint", default=None,
                   help="export this checkpoint (a folder, or step_N under the run's checkpoints/) instead of the final weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    _model_flag(p)
    p.set_defaults(func=_cmd_export)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every exported file against the eager model over a whole split")
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="export folder (exports/<name>)")
    _data_flags(p)
    p.add_argument("--split", choices=HELD_OUT_SPLITS, default=HELD_OUT_SPLITS[0])
    p.add_argument("--json-out", type=Path, default=None, help="also write the report as JSON here")
    _tolerance_flags(p)
    _tta_flag(p, "every format, eager included, classifies each image from these views (default: none)")
    _threads_flag(p)
    _provider_flag(p)
    _model_flag(p)
    p.set_defaults(func=_cmd_verify)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label image files with an exported model (.onnx, .ts, .pt2)")
    p.add_argument("artifact", type=Path, metavar="PATH",
                   help="model.onnx (or model.fp16.onnx, model.int8.onnx), model.ts, model.pt2 or eager weights")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="PNG/JPEG files, any size")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--top-k", dest="top_k", type=int, default=1, help="classes shown per image (default 1)")
    _threads_flag(p)
    p.add_argument("--no-hash-check", dest="check_hash", action="store_false",
                   help="use the file even if its sha256 differs from the manifest.json beside it, or if it is "
                        "a .ts/.pt2 program that no manifest.json lists")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"refuse more than this many images per call (default {DEFAULT_MAX_BATCH})")
    _provider_flag(p)
    _model_flag(p)
    p.set_defaults(func=_cmd_predict)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve ONNX models over HTTP (Open Inference Protocol / KServe v2, as Triton "
                                     "speaks it) with dynamic batching, Prometheus metrics and graceful drain; "
                                     "needs the serve extra")
    d = SERVE_DEFAULTS
    p.add_argument("paths", type=Path, nargs="+", metavar="EXPORT_DIR_OR_ONNX_FILE",
                   help="export folders (every ONNX format in one is a model named <folder>-<format>) or .onnx "
                        "files (named by their stem)")
    p.add_argument("--host", default=d["host"], help=f"address to listen on (default {d['host']}: this machine only)")
    p.add_argument("--port", type=int, default=d["port"], help=f"port (default {d['port']}; 0: any free port, printed)")
    _provider_flag(p)
    _threads_flag(p)
    p.add_argument("--instances", type=int, default=d["instances"],
                   help="ONNX Runtime sessions per model, each running one batch at a time "
                        f"(default {d['instances']}); without --threads they share the CPU cores")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=d["max_batch_size"],
                   help=f"most images per model execution, and per request (default {d['max_batch_size']})")
    p.add_argument("--max-queue-delay-ms", dest="max_queue_delay_ms", type=float, default=d["max_queue_delay_ms"],
                   help=f"how long a batch that is not full may wait for more requests, in ms (default "
                        f"{d['max_queue_delay_ms']:g}; 0: never wait while a session is idle, and run a cheap request "
                        "at once when nothing waits)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=d["max_queue"],
                   help=f"requests waiting per model before new ones get 503 with Retry-After "
                        f"(default {d['max_queue']})")
    p.add_argument("--timeout-ms", dest="timeout_ms", type=float, default=d["timeout_ms"],
                   help=f"answer 504 when a request has no result after this many ms (default {d['timeout_ms']:g}; "
                        "0: never)")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=int, default=d["max_request_bytes"],
                   help=f"answer 413 to a larger request body (default {d['max_request_bytes']})")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, default=d["shutdown_timeout"],
                   help="on SIGTERM/SIGINT, seconds to finish the requests in flight before exiting (default "
                        f"{d['shutdown_timeout']:g})")
    p.add_argument("--api-key", dest="api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but the health probes")
    p.add_argument("--no-hash-check", dest="check_hash", action="store_false",
                   help="serve a file even if its sha256 differs from the manifest.json beside it")
    p.set_defaults(func=_cmd_serve)
def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="measure an inference server (Open Inference Protocol v2) at several "
                                        "concurrency levels: requests/s, images/s, latency percentiles")
    p.add_argument("url", metavar="URL", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name as the server lists it, e.g. main-onnx")
    p.add_argument("--concurrency", default="1,8,32,128", metavar="C,C,...",
                   help="comma-separated levels: clients each keeping one request in flight (default 1,8,32,128)")
    p.add_argument("--duration", dest="duration_s", type=float, default=5.0, metavar="S",
                   help="measured seconds per level (default 5)")
    p.add_argument("--warmup", dest="warmup_s", type=float, default=1.0, metavar="S",
                   help="seconds per level run before measuring (default 1)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="images per request (default 1)")
    p.add_argument("--json-body", dest="json_body", action="store_true",
                   help="send JSON tensors (default: the binary tensor extension)")
    p.add_argument("--input-dtype", dest="input_dtype", default="fp32", metavar="DTYPE",
                   help="fp32: normalized N×3×32×32; uint8: pixels N×32×32×3 that the server normalizes "
                        "(default fp32)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=30.0, metavar="S",
                   help="seconds before an unanswered request counts as a timeout (default 30)")
    p.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE",
                   help="also write the results here")
    p.set_defaults(func=_cmd_loadtest)


# One function per command, in the order `toolkit --help` lists them.
_COMMANDS = (_add_train, _add_run, _add_status, _add_report, _add_evaluate, _add_export, _add_verify, _add_predict,
             _add_serve, _add_loadtest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit", description="Train image classifiers with Hugging Face Accelerate, "
                                     "export them, verify every export against the eager model, and predict.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _train_config(args: argparse.Namespace, *extra: str) -> TrainConfig:
    """The config from --config (if given) and the config flags given on the command line (`extra`: other flags)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config_file", *extra)}
    file = vars(args).get("config_file")
    return build_train_config(read_config_file(file) if file else None, flags)


def _cmd_train(args: argparse.Namespace) -> int:
    from toolkit.training.train import train  # per command: imports torch

    train(_train_config(args))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from toolkit.apps.pipeline import run_pipeline  # per command: imports torch

    cfg = _train_config(args, "export_dir", "formats", "atol", "rtol")
    run_pipeline(cfg, args.export_dir, formats.parse_formats(args.formats), args.atol, args.rtol)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(status_field(args.run, args.field) if args.field else describe_status(args.run))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from toolkit.apps.report import build_report  # per command: imports matplotlib

    print(f"report: {build_report(args.run)}")
    return 0


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _DATA_OVERRIDES if hasattr(args, k)}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from toolkit.training.evaluate import evaluate_run  # per command: imports torch

    evaluate_run(args.run, _data_overrides(args), args.split, args.json_out, model=args.model, tta=args.tta)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from toolkit.artifacts.export import export_run  # per command: imports torch

    export_run(args.run, args.out, formats.parse_formats(args.formats), args.checkpoint, args.overwrite,
               model=args.model)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from toolkit.apps.verify import verify_and_report  # per command: imports torch

    verify_and_report(args.export_dir, _data_overrides(args), args.split, args.atol, args.rtol, args.json_out,
                      args.threads, provider=args.provider, model=args.model, tta=args.tta or "none")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from toolkit.apps.predict import predict_and_report  # per command: torch only for torch formats

    predict_and_report(args.artifact, args.images, args.top_k, args.threads, args.check_hash, args.json,
                       max_batch=args.max_batch, provider=args.provider, model=args.model)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from toolkit.apps.serve import serve  # per command: starlette, uvicorn, onnxruntime
    from toolkit.apps.serving.config import ServeConfig  # reason: only this command builds one

    serve(ServeConfig(args.paths, host=args.host, port=args.port, provider=args.provider, threads=args.threads,
                      instances=args.instances, max_batch_size=args.max_batch_size,
                      max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue, timeout_ms=args.timeout_ms,
                      max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
                      api_key=args.api_key, check_hash=args.check_hash))
def _cmd_loadtest(args: argparse.Namespace) -> int:
    from toolkit.apps.loadtest import LoadtestConfig, loadtest_and_report, parse_concurrency  # per command

    config = LoadtestConfig(args.url, args.model, parse_concurrency(args.concurrency), args.duration_s, args.warmup_s,
                            args.batch, args.json_body, args.input_dtype, args.timeout_s)
    loadtest_and_report(config, args.json_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # big tensors reused, not faulted in again each training or inference step
    try:
        return args.func(args)
    except ToolkitError as exc:
        print(f"toolkit {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        print(f"toolkit {args.command}: interrupted", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:  # disk full, unwritable folder: the file and the reason, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"toolkit {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return exit_code(exc)

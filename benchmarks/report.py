"""`python -m benchmarks.report`: tables and a bar chart from saved pytest-benchmark results.

Input: the JSON that `make bench` writes (`pytest --benchmark-json=...`, default the newest
`benchmarks/results/*.json`). Everything is read from each benchmark's `stats.median` (seconds per
timed call) and `extra_info`, which the benchmark suite fills:

- every row: `model` (a built-in model's name; rows without one measured `tutorial`, the suite's only model
  before per-model rows), except the machine's own rows (`matmul`), which belong to no model. The report has
  one section per model, in the order the file first names them, after a section for the machine;
- inference rows (`extra_info.kind == "inference"`): `backend` (a format of
  `toolkit.artifacts.formats`, with `-cuda`/`-tensorrt` when it ran on a GPU, `-device` with IO binding,
  and `onnx-session` for the raw `InferenceSession.run` behind the `onnx` rows), `batch`, `threads` (an
  int, or "default" for ONNX Runtime's own choice), `weights` (trained or untrained, shown once per model).
  The median is the latency of one batch; images/s is batch / median; the speed-up is eager's median for
  the same model at the same batch and thread count divided by this row's (rows with threads "default" are
  compared with the model's eager row at its highest thread count);
- other rows (training, launch, time-to-accuracy, export, verify, matmul): `kind`, `label`, and
  when present `images_per_s` (which for `launch` and `time_to_accuracy` comes from the trainer's
  own metrics, not from the wall time), `share_of_matmul_peak`, `gflops`, `final_val_accuracy`,
  `time_to_accuracy`, `bytes`, `images`; `train_step` rows also `precision`, `memory_format` and `batch`,
  which a summary table of training images/s per model reads.

- serving rows (`kind == "serving"`, benchmarks/test_serving.py): `batch` (images per request), `floor` (the
  no-op server's name), `servers` (per server, one `toolkit loadtest` level per round: `concurrency`,
  `infer_per_s`, `images_per_s`, `latency_ms` p50/p99, `errors`, `server_avg_batch`; the servers' rounds of one
  index were measured one after another) and `in_process` (per round: images/s and the median call in ms of the
  model called in the benchmark's own process). A row per server and concurrency gives the median over its
  rounds (errors: the sum); its share of the floor, its ratio to the naive server and its share of the
  in-process images/s are medians of the rounds' ratios.

`--json` prints the inference rows as `{model, backend, batch, threads, median_ms, images_per_s,
speedup_vs_eager, weights}` (plus `file` when several files are given); otherwise a Markdown report is
printed and a PNG bar chart written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from toolkit.artifacts import formats
from toolkit.core.errors import ToolkitError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROW_KEYS = ("model", "backend", "batch", "threads", "median_ms", "images_per_s", "speedup_vs_eager", "weights")
DEFAULT_MODEL = "tutorial"  # the model of a row that names none (files from before per-model rows)
MACHINE_KINDS = ("matmul",)  # rows that measure the machine, not a model
_PRECISION_ORDER = ("fp32", "bf16", "fp16")  # columns of the training summary, then any other, by name
_LAYOUT_ORDER = ("contiguous", "channels_last")
_KIND_ORDER = ("matmul", "interface_overhead", "train_step", "epoch", "launch", "time_to_accuracy", "export",
               "verify")
# The issues' targets on a 2-core CPU, for the tutorial network's rows: (what, threshold).
TARGET_MODEL = "tutorial"
TARGET_ORT_BATCH1 = 6.0  # ONNX Runtime batch-1 latency at least 6× lower than eager
TARGET_ORT_BATCH1024 = 3.0  # ONNX Runtime batch-1024 throughput at least 3× eager
TARGET_WRAPPER_OVERHEAD = 0.10  # Backend.predict_logits at most 10 % slower than InferenceSession.run, batch 1
TARGET_FAST_VS_PIL = 5.0  # fast training path at least 5× the tutorial DataLoader's images/s
# `toolkit serve`, single-image requests: at least 70 % of the no-op server's requests/s at concurrency 32, and at
# least the naive inline server's at every concurrency measured.
TARGET_SERVE_VS_FLOOR = 0.70
TARGET_SERVE_FLOOR_CONCURRENCY = 32
TARGET_SERVE_VS_IN_PROCESS = 0.50  # batch-64 requests: images/s through the server / in-process at batch 64
TARGET_SERVE_ADDED_MS = 1.0  # concurrency 1: the server's p50 minus the in-process call's, ms
NAIVE_SERVER, SERVE_SERVER = "naive", "serve"
SESSION_SUFFIX = "-session"  # the raw InferenceSession.run row of an ONNX Runtime format
_ROW_SUFFIXES = ("-device", SESSION_SUFFIX, "-cuda", "-tensorrt")  # what a row adds to its format's name


class BenchReportError(ToolkitError):
    """No results file, or one that is not a pytest-benchmark JSON of this suite."""


# ---------------------------------------------------------------------------------------------
# Reading


def newest_results(results_dir: Path = RESULTS_DIR) -> Path:
    """The most recently modified `*.json` directly in `results_dir`."""
    files = sorted(Path(results_dir).glob("*.json"), key=lambda p: p.stat().st_mtime) \
        if Path(results_dir).is_dir() else []
    if not files:
        raise BenchReportError(f"no benchmark results in {results_dir}/ (run `make bench` first, or pass a FILE)")
    return files[-1]


def load_results(path: Path) -> dict[str, Any]:
    """A pytest-benchmark JSON file, checked to hold a `benchmarks` list."""
    path = Path(path)
    if not path.is_file():
        raise BenchReportError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchReportError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BenchReportError(f"{path}: not a pytest-benchmark results file (no 'benchmarks' list)")
    return data


def _benchmarks(data: dict[str, Any], path: Path) -> Iterable[tuple[dict[str, Any], float]]:
    """(extra_info, median seconds) of every benchmark that carries this suite's extra_info."""
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") if isinstance(bench, dict) else None
        median = (bench.get("stats") or {}).get("median") if isinstance(bench, dict) else None
        if not isinstance(info, dict) or "kind" not in info:
            continue
        if not isinstance(median, (int, float)) or not median > 0:
            raise BenchReportError(f"{path}: benchmark {bench.get('name')!r} has no positive stats.median")
        yield {**info, "name": bench.get("name")}, float(median)


def _format_of(backend: str) -> str:
    """The format a backend row measured: `onnx-cuda` -> `onnx`, `onnx-int8-cuda-device` -> `onnx-int8`."""
    for suffix in _ROW_SUFFIXES:
        backend = backend.removesuffix(suffix)
    return backend


def _model_of(info: dict[str, Any]) -> str | None:
    """The model a row measured (None: the machine itself)."""
    return None if info["kind"] in MACHINE_KINDS else str(info.get("model") or DEFAULT_MODEL)


def _thread_key(threads: Any) -> tuple[int, float]:
    return (0, float(threads)) if isinstance(threads, (int, float)) else (1, 0.0)


def _inference_rows(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    rows = []
    for info, median in _benchmarks(data, path):
        if info["kind"] != "inference":
            continue
        try:
            batch = int(info["batch"])
            backend, threads = str(info["backend"]), info["threads"]
        except (KeyError, TypeError, ValueError):
            raise BenchReportError(f"{path}: inference benchmark {info['name']!r} lacks backend/batch/threads "
                                   "in extra_info") from None
        rows.append({"model": _model_of(info), "backend": backend, "batch": batch, "threads": threads,
                     "median_ms": median * 1e3, "images_per_s": batch / median, "speedup_vs_eager": None,
                     "weights": info.get("weights")})
    # Speed-up over the same model's eager at the same batch and thread count; a non-numeric thread
    # setting (ONNX Runtime's default) is compared with that model's eager at its highest pinned count.
    eager = {(r["model"], r["batch"], r["threads"]): r["median_ms"] for r in rows if r["backend"] == "eager"}
    top: dict[str, float] = {}
    for model, _, t in eager:
        if isinstance(t, (int, float)):
            top[model] = max(t, top.get(model, t))
    for r in rows:
        threads = r["threads"] if isinstance(r["threads"], (int, float)) else top.get(r["model"])
        base = eager.get((r["model"], r["batch"], threads))
        r["speedup_vs_eager"] = base / r["median_ms"] if base else None
    models = _first_seen(r["model"] for r in rows)
    rows.sort(key=lambda r: (models[r["model"]], r["batch"], formats.order(_format_of(r["backend"])), r["backend"],
                             _thread_key(r["threads"])))
    return rows


def _first_seen(models: Iterable[str | None]) -> dict[str | None, int]:
    """model -> its rank in order of first appearance (the machine's rows, None, first)."""
    order: dict[str | None, int] = {None: -1}
    for m in models:
        order.setdefault(m, len(order) - 1)
    return order


def load_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Inference rows {model, backend, batch, threads, median_ms, images_per_s, speedup_vs_eager, weights} of the
    files (`weights`: what the file says the model's weights were, else None).

    With several files every row also names its `file`; speed-ups are computed within each file.
    """
    out = []
    for path in paths:
        rows = _inference_rows(load_results(path), Path(path))
        if len(paths) > 1:
            rows = [{**r, "file": str(path)} for r in rows]
        out.extend(rows)
    return out


def load_other_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Training, launch, time-to-accuracy, export, verify and matmul rows of the files, and the interface
    overhead that the raw-session benchmarks measured in alternating rounds."""
    out = []
    for path in paths:
        for info, median in _benchmarks(load_results(path), Path(path)):
            if info["kind"] == "inference" and "interface_overhead" in info:
                info = {**info, "kind": "interface_overhead",
                        "label": f"predict_logits vs InferenceSession.run, batch 1, threads {info['threads']}"}
                median = info["interleaved_predict_logits_ms"] / 1e3
            elif info["kind"] in ("inference", "serving"):
                continue
            row = {"kind": info["kind"], "model": _model_of(info), "label": info.get("label") or info["name"],
                   "median_s": median, "images_per_s": info.get("images_per_s"),
                   "share_of_matmul_peak": info.get("share_of_matmul_peak"), "threads": info.get("threads"),
                   "info": info}
            if len(paths) > 1:
                row["file"] = str(path)
            out.append(row)
    order = {k: i for i, k in enumerate(_KIND_ORDER)}
    models = _first_seen(r["model"] for r in out)
    out.sort(key=lambda r: (models[r["model"]], r.get("file", ""), order.get(r["kind"], len(order))))
    return out


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _serving_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One serving benchmark's rows: per server (but the floor) and concurrency, its rounds summarized (medians;
    errors summed), and its ratios to the servers and the in-process model measured in the same rounds."""
    servers: dict[str, list[dict[str, Any]]] = info["servers"]
    floor = servers[info["floor"]]
    local = info.get("in_process") or []
    rows = []
    for server, levels in servers.items():
        if server == info["floor"]:
            continue
        for concurrency in dict.fromkeys(int(level["concurrency"]) for level in levels):
            at = [i for i, level in enumerate(levels) if int(level["concurrency"]) == concurrency]
            rounds = [levels[i] for i in at]

            def ratio(other: list[dict[str, Any]]) -> float | None:
                """The median over rounds of this server's images/s over `other`'s in the same round."""
                pairs = [(levels[i], other[i]) for i in at if i < len(other)]
                return _median(float(r["images_per_s"]) / float(o["images_per_s"]) for r, o in pairs
                               if float(o["images_per_s"]) > 0)

            errors: dict[str, int] = {}
            for level in rounds:
                for status, count in level["errors"].items():
                    errors[status] = errors.get(status, 0) + int(count)
            rows.append({
                "server": server, "batch": int(info["batch"]), "concurrency": concurrency, "rounds": len(rounds),
                "infer_per_s": _median(float(r["infer_per_s"]) for r in rounds),
                "images_per_s": _median(float(r["images_per_s"]) for r in rounds),
                "p50_ms": _median(r["latency_ms"]["p50"] for r in rounds),
                "p99_ms": _median(r["latency_ms"]["p99"] for r in rounds), "errors": errors,
                "server_avg_batch": _median(r.get("server_avg_batch") for r in rounds),
                "floor_infer_per_s": _median(float(floor[i]["infer_per_s"]) for i in at),
                "share_of_floor": ratio(floor),
                "vs_naive": ratio(servers[NAIVE_SERVER]) if server != NAIVE_SERVER and NAIVE_SERVER in servers else None,
                "share_of_in_process": ratio(local) if local else None,
                "added_p50_ms": _median(levels[i]["latency_ms"]["p50"] - float(local[i]["p50_ms"]) for i in at
                                        if i < len(local) and levels[i]["latency_ms"]["p50"] is not None)})
    return rows


def load_serving_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per server, batch and concurrency level of the serving benchmarks: {server, batch, concurrency,
    rounds, infer_per_s, images_per_s, p50_ms, p99_ms, errors, server_avg_batch, floor_infer_per_s,
    share_of_floor, vs_naive, share_of_in_process, added_p50_ms} (+ `file`), medians over rounds; the ratios
    pair each round with the floor's, the naive server's and the in-process model's measured beside it."""
    out = []
    order = {NAIVE_SERVER: 0, SERVE_SERVER: 1}
    for path in paths:
        rows = []
        for info, _ in _benchmarks(load_results(path), Path(path)):
            if info["kind"] != "serving":
                continue
            try:
                rows += _serving_rows(info)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise BenchReportError(f"{path}: serving benchmark {info['name']!r} lacks batch/floor/servers "
                                       "in extra_info (written before this report's format?)") from None
        if len(paths) > 1:
            rows = [{**r, "file": str(path)} for r in rows]
        out += sorted(rows, key=lambda r: (r["batch"], r["concurrency"], order.get(r["server"], 2), r["server"]))
    return out


def describe_machine(path: Path) -> str:
    """One line: CPU, cores, Python, library versions and the thread count, from the file's machine_info."""
    data = load_results(path)
    machine = data.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    suite = machine.get("toolkit_bench") or {}
    parts = [cpu.get("brand_raw") or machine.get("processor") or machine.get("machine") or "unknown CPU",
             f"{cpu.get('count', '?')} logical CPUs"]
    if suite:
        parts.append(", ".join(f"{k} {v}" for k, v in suite.get("versions", {}).items()))
        parts.append(f"'all' threads = {suite.get('threads_all')}")
        if suite.get("data"):
            parts.append(f"data: {suite['data']}")
    parts.append(f"Python {machine.get('python_version', '?')}")
    when = data.get("datetime")
    commit = (data.get("commit_info") or {}).get("id")
    parts.append(f"run {when[:19] if when else '?'}" + (f", commit {commit[:10]}" if commit else ""))
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Rendering


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _speedup(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _notes(row: dict[str, Any]) -> str:
    info, kind = row["info"], row["kind"]
    if kind == "interface_overhead":
        return (f"{info['interleaved_predict_logits_ms'] * 1e3:.1f} µs vs {info['interleaved_session_ms'] * 1e3:.1f} µs "
                f"raw ({100 * info['interface_overhead']:+.1f} %), alternating rounds")
    if kind == "matmul":
        return f"{_num(info.get('gflops'))} GFLOP/s" if info.get("gflops") else ""
    if kind == "time_to_accuracy":
        tta = info.get("time_to_accuracy") or {}
        reached = [f"{100 * float(t):.0f} % at {s:.0f} s" for t, s in tta.items() if s is not None]
        final = info.get("final_val_accuracy")
        evaluated = info.get("eval_accuracy")
        return (f"final val acc {_percent(final)} after {_num(info.get('train_seconds'))} s training "
                f"({info.get('epochs')} epochs, batch {info.get('batch')})"
                + (f", final evaluation {_percent(evaluated)}" if evaluated is not None else "")
                + ("; " + ", ".join(reached) if reached else ""))
    if kind == "launch":
        return f"global batch {info.get('global_batch')}, {info.get('steps')} steps; images/s from metrics.jsonl"
    if kind == "epoch":
        return f"{info.get('images')} images; {info.get('loader', '')}"
    if kind == "export":
        size = info.get("bytes")
        return f"{info.get('file', '')}" + (f", {size / 1024:.0f} KiB" if size else "")
    if kind == "verify":
        return f"{info.get('images')} images × {len(info.get('formats', []))} formats"
    return ""


def _serving_targets(serving: Sequence[dict[str, Any]]) -> list[str]:
    """`toolkit serve` against the no-op floor at concurrency 32, against the naive server at every level, and
    against the model in-process (batch-64 images/s, concurrency-1 latency): ratios of rounds measured together."""
    serve = [r for r in serving if r["server"] == SERVE_SERVER and "file" not in r]
    single = {r["concurrency"]: r for r in serve if r["batch"] == 1}
    lines = []
    at = single.get(TARGET_SERVE_FLOOR_CONCURRENCY, {}).get("share_of_floor")
    if at is not None:
        lines.append(f"- toolkit serve, single-image requests, concurrency {TARGET_SERVE_FLOOR_CONCURRENCY}: "
                     f"≥ {100 * TARGET_SERVE_VS_FLOOR:.0f} % of the no-op server's requests/s: {_percent(at)} — "
                     f"**{'met' if at >= TARGET_SERVE_VS_FLOOR else 'not met'}**")
    ratios = [(c, r["vs_naive"]) for c, r in single.items() if r["vs_naive"] is not None]
    if ratios:
        lines.append("- toolkit serve, single-image requests: ≥ the naive inline server's requests/s at every "
                     "concurrency (median of the rounds' ratios): "
                     + ", ".join(f"{ratio:.2f}× (concurrency {c})" for c, ratio in ratios)
                     + f" — **{'met' if min(r for _, r in ratios) >= 1 else 'not met'}**")
    for r in serve:
        if r["batch"] > 1 and r["share_of_in_process"] is not None:
            lines.append(f"- toolkit serve, {r['batch']}-image requests from {r['concurrency']} clients: ≥ "
                         f"{100 * TARGET_SERVE_VS_IN_PROCESS:.0f} % of the model's images/s in-process at that batch "
                         f"(same threads, alternating rounds): {_percent(r['share_of_in_process'])} — "
                         f"**{'met' if r['share_of_in_process'] >= TARGET_SERVE_VS_IN_PROCESS else 'not met'}**")
        if r["batch"] == 1 and r["concurrency"] == 1 and r["added_p50_ms"] is not None:
            lines.append(f"- toolkit serve, concurrency 1: adds ≤ {TARGET_SERVE_ADDED_MS:g} ms p50 over the "
                         f"in-process call: +{r['added_p50_ms']:.2f} ms — "
                         f"**{'met' if r['added_p50_ms'] <= TARGET_SERVE_ADDED_MS else 'not met'}**")
    return lines


def _targets(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for the tutorial network, measured: met only if every comparable row meets it (no
    cherry-picking)."""
    lines = []

    def check(what: str, ratios: list[tuple[str, float]], target: float) -> None:
        if not ratios:
            return
        worst = min(r for _, r in ratios)
        shown = ", ".join(f"{r:.2f}× ({label})" for label, r in ratios)
        lines.append(f"- {what} ≥ {target:g}×: {shown} — **{'met' if worst >= target else 'not met'}**")

    rows = [r for r in rows if r["model"] == TARGET_MODEL]
    other = [r for r in other if r["model"] == TARGET_MODEL]

    def ratios(name: str, batch: int) -> list[tuple[str, float]]:
        return [(f"threads {r['threads']}", r["speedup_vs_eager"]) for r in rows
                if r["backend"] == name and r["batch"] == batch and r["speedup_vs_eager"] and "file" not in r]

    # The targets are ONNX Runtime's (model.onnx); the other ONNX files are shown beside them, unjudged.
    for batch, target, what in ((1, TARGET_ORT_BATCH1, "batch-1 latency vs eager"),
                                (1024, TARGET_ORT_BATCH1024, "batch-1024 throughput vs eager")):
        check(f"ONNX Runtime {what}", ratios(formats.ONNX.name, batch), target)
        for f in formats.FORMATS:
            if f.runtime == "onnxruntime" and f != formats.ONNX and ratios(f.name, batch):
                lines.append(f"  - for comparison, {f.name}: "
                             + ", ".join(f"{r:.2f}× ({label})" for label, r in ratios(f.name, batch)))
    overhead = _wrapper_overhead(rows, other)
    if overhead:
        worst = max(o for _, o in overhead)
        lines.append(f"- ONNX Runtime interface overhead at batch 1 (`predict_logits` vs `InferenceSession.run`) "
                     f"≤ {100 * TARGET_WRAPPER_OVERHEAD:.0f} %: "
                     + ", ".join(f"{100 * o:.1f} % ({label})" for label, o in overhead)
                     + f" — **{'met' if worst <= TARGET_WRAPPER_OVERHEAD else 'not met'}**")
    epochs = {(r["info"].get("path"), r["info"].get("precision")): r["images_per_s"] for r in other
              if r["kind"] == "epoch" and r["images_per_s"] and "file" not in r}
    ratios = [(precision, epochs[("fast", precision)] / epochs[("pil", precision)])
              for (path, precision) in epochs if path == "pil" and ("fast", precision) in epochs]
    check("fast training epoch vs the tutorial's PIL DataLoader (images/s, same batch)", ratios, TARGET_FAST_VS_PIL)
    tta = {r["info"].get("recipe"): r["info"] for r in other if r["kind"] == "time_to_accuracy" and "file" not in r}
    if "fast" in tta and "seed" in tta and tta["seed"].get("final_val_accuracy") is not None:
        goal = tta["seed"]["final_val_accuracy"]
        fast_at = next((s for _, s, acc in tta["fast"].get("curve", []) if acc is not None and acc >= goal), None)
        seed_at = tta["seed"].get("train_seconds")
        lines.append(f"- time to the seed recipe's final val accuracy ({_percent(goal)}): recipe fast "
                     + (f"{fast_at:.0f} s" if fast_at is not None else "never")
                     + f", recipe seed {_num(seed_at)} s of training")
    return lines


def _wrapper_overhead(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(threads label, predict_logits / session.run - 1) at batch 1: measured in alternating rounds when the
    file has it, else from the two rows' medians (results files from before that measurement)."""
    alternating = [(f"threads {r['threads']}", r["info"]["interface_overhead"]) for r in other
                   if r["kind"] == "interface_overhead" and "file" not in r]
    if alternating:
        return alternating
    sessions = {r["threads"]: r["median_ms"] for r in rows
                if r["backend"] == formats.ONNX.name + SESSION_SUFFIX and r["batch"] == 1 and "file" not in r}
    return [(f"threads {r['threads']}", r["median_ms"] / sessions[r["threads"]] - 1) for r in rows
            if r["backend"] == formats.ONNX.name and r["batch"] == 1 and r["threads"] in sessions and "file" not in r]


def _table(header: list[str], rows: list[dict[str, Any]], cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """A Markdown table of `rows`, with a leading `file` column when they come from several files."""
    several = any("file" in r for r in rows)
    lines = ["| " + " | ".join((["file"] if several else []) + header) + " |", "|" + "---|" * (len(header) + several)]
    lines += ["| " + " | ".join(([Path(r["file"]).name] if several else []) + cells(r)) + " |" for r in rows]
    return lines + [""]


def _inference_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(["backend", "threads", "batch", "median ms / batch", "images/s", "speed-up vs eager"], rows,
                  lambda r: [r["backend"], str(r["threads"]), str(r["batch"]), _num(r["median_ms"]),
                             _num(r["images_per_s"]), _speedup(r["speedup_vs_eager"])])


def _other_table(other: list[dict[str, Any]]) -> list[str]:
    return _table(["benchmark", "threads", "median s", "images/s", "share of matmul peak", "notes"], other,
                  lambda r: [r["label"], str(r["threads"] if r["threads"] is not None else "–"),
                             _num(r["median_s"]), _num(r["images_per_s"]),
                             _percent(r["share_of_matmul_peak"]), _notes(r)])


def _train_step_summary(other: list[dict[str, Any]]) -> list[str]:
    """Training images/s, one line per model and batch, one column per precision and memory format (the
    train_step rows that name both; several files: none, their rows are in each model's table)."""
    steps = [r for r in other if r["kind"] == "train_step" and r["images_per_s"] and "file" not in r
             and r["info"].get("precision") and r["info"].get("memory_format")]
    if not steps:
        return []
    def rank(value: str, known: tuple[str, ...]) -> tuple[int, str]:
        return (known.index(value) if value in known else len(known), value)

    columns = sorted({(r["info"]["precision"], r["info"]["memory_format"]) for r in steps},
                     key=lambda c: (rank(c[0], _PRECISION_ORDER), rank(c[1], _LAYOUT_ORDER)))
    lines = list(dict.fromkeys((r["model"], r["info"].get("batch")) for r in steps))
    value = {(r["model"], r["info"].get("batch"), r["info"]["precision"], r["info"]["memory_format"]):
             r["images_per_s"] for r in steps}
    threads = sorted({str(r["threads"]) for r in steps})
    out = [f"Training step images/s (forward, backward, SGD step; threads {', '.join(threads)}):", ""]
    out.append("| model | batch | " + " | ".join(f"{p} {m}" for p, m in columns) + " |")
    out.append("|" + "---|" * (len(columns) + 2))
    for model, batch in lines:
        out.append(f"| {model} | {batch} | " + " | ".join(_num(value.get((model, batch, p, m))) for p, m in columns)
                   + " |")
    return out + [""]


def render_markdown(rows: list[dict[str, Any]], other: list[dict[str, Any]] | None = None,
                    machine: str | None = None, serving: list[dict[str, Any]] | None = None) -> str:
    """The machine's own rows, then one section per model (its inference table, then its other results), a
    summary of training images/s per model, the serving table, and the targets."""
    other = other or []
    out = []
    if machine:
        out += [f"Machine: {machine}", ""]
    models = list(_first_seen([*(r["model"] for r in rows), *(r["model"] for r in other)]))
    for model in models:
        inference = [r for r in rows if r["model"] == model]
        others = [r for r in other if r["model"] == model]
        if not inference and not others:
            continue
        out += ["## The machine", ""] if model is None else [f"## Model `{model}`", ""]
        weights = list(dict.fromkeys(r["weights"] for r in inference if r.get("weights")))
        if weights:
            out += [f"Inference weights: {'; '.join(weights)}.", ""]
        if inference:
            out += _inference_table(inference)
        if others:
            out += _other_table(others)
    out += _train_step_summary(other)
    if serving:
        out += ["## Serving", "",
                "`toolkit loadtest`, binary requests, client and servers on this machine; medians over rounds in "
                "which the servers took turns (the no-op floor, the naive server, `toolkit serve`):", ""]
        out += _table(["server", "images / request", "concurrency", "requests/s", "images/s", "p50 ms", "p99 ms",
                       "no-op requests/s", "share of no-op", "vs naive", "server batch", "errors"], serving,
                      lambda r: [r["server"], str(r["batch"]), str(r["concurrency"]), _num(r["infer_per_s"]),
                                 _num(r["images_per_s"]), _num(r["p50_ms"]), _num(r["p99_ms"]),
                                 _num(r["floor_infer_per_s"]), _percent(r["share_of_floor"]),
                                 "–" if r["vs_naive"] is None else f"{r['vs_naive']:.2f}×",
                                 _num(r["server_avg_batch"]),
                                 ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"])
    targets = _targets(rows, other)
    if targets:
        out += [f"Targets (this run, model `{TARGET_MODEL}`):", *targets, ""]
    serving_targets = _serving_targets(serving or [])
    if serving_targets:
        out += ["Serving targets (this run):", *serving_targets, ""]
    if not rows and not other and not serving:
        out.append("(no toolkit benchmark results in the file)")
    return "\n".join(out).rstrip() + "\n"


def plot(rows: list[dict[str, Any]], png_path: Path) -> Path:
    """Bar chart of inference images/s: one row of panels per model, one panel per batch size, one bar per
    backend and thread setting.

    Drawn on a `matplotlib.figure.Figure` directly, as `toolkit.apps.plots` does: no pyplot, no GUI backend.
    """
    png_path = Path(png_path)
    batches = sorted({r["batch"] for r in rows})
    if not batches:
        raise BenchReportError("no inference rows to plot")
    models = [m for m in _first_seen(r["model"] for r in rows) if m is not None]
    tallest = [max(sum(r["batch"] == b and r["model"] == m for r in rows) for b in batches) for m in models]
    fig = Figure(figsize=(4.2 * len(batches), sum(0.45 * n + 1.2 for n in tallest) + 0.4))
    axes = fig.subplots(len(models), len(batches), squeeze=False, gridspec_kw={"height_ratios": tallest})
    colors = {"eager": "#4c72b0", "torchscript": "#55a868", "pt2": "#8172b2", "onnx": "#c44e52", "onnx-fp16": "#dd8452",
              "onnx-int8": "#da8bc3"}
    for model, panels in zip(models, axes):
        for ax, batch in zip(panels, batches):
            selected = [r for r in rows if r["batch"] == batch and r["model"] == model]
            if not selected:
                ax.set_axis_off()
                continue
            labels = [(f"{Path(r['file']).stem}: " if "file" in r else "") + f"{r['backend']} t={r['threads']}"
                      for r in selected]
            values = [r["images_per_s"] for r in selected]
            ax.barh(range(len(selected)), values,
                    color=[colors.get(_format_of(r["backend"]), "#937860") for r in selected])
            ax.set_yticks(range(len(selected)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.set_xlabel("images/s (higher is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            for i, r in enumerate(selected):
                if r["speedup_vs_eager"]:
                    ax.text(values[i], i, f" {r['speedup_vs_eager']:.1f}×", va="center", fontsize=7)
            ax.set_xlim(0, max(values) * 1.25)
    fig.suptitle("Inference throughput per model (× = speed-up vs eager, same model and threads)", fontsize=10)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


def bench_report(files: Sequence[Path] = (), as_json: bool = False, png: Path | None = None,
                 no_png: bool = False, results_dir: Path = RESULTS_DIR, out=print, log=None) -> list[dict[str, Any]]:
    """Print the Markdown report (or the JSON rows) and write the chart.

    The chart goes to `png`, else beside the last results file with a .png suffix; with `--json`
    only when `png` is given.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    paths = [Path(f) for f in files] or [newest_results(results_dir)]
    rows = load_rows(paths)
    other = load_other_rows(paths)
    serving = load_serving_rows(paths)
    if not rows and not other and not serving:
        raise BenchReportError(f"{', '.join(map(str, paths))}: no benchmark of this suite (no extra_info 'kind')")
    if as_json:
        out(json.dumps(rows, indent=2))
    else:
        machine = describe_machine(paths[-1]) if len(paths) == 1 else None
        out(render_markdown(rows, other, machine, serving).rstrip("\n"))
    if rows and not no_png and (png is not None or not as_json):
        target = plot(rows, png if png is not None else paths[-1].with_suffix(".png"))
        log(f"benchmarks.report: chart written to {target}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Markdown table and bar chart of saved benchmark results (make bench)")
    parser.add_argument("files", type=Path, nargs="*", metavar="FILE",
                        help="pytest-benchmark JSON files (default: the newest benchmarks/results/*.json)")
    parser.add_argument("--json", action="store_true",
                        help="print the inference rows as JSON {model, backend, batch, threads, median_ms, "
                             "images_per_s, speedup_vs_eager, weights} instead of Markdown")
    parser.add_argument("--png", type=Path, default=None,
                        help="bar chart path (default: beside the newest FILE, .png; with --json only when given)")
    parser.add_argument("--no-png", dest="no_png", action="store_true", help="do not write the bar chart")
    args = parser.parse_args(argv)
    try:
        bench_report(args.files, args.json, args.png, args.no_png)
    except BenchReportError as exc:
        print(f"benchmarks.report: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`runs/<name>/report.md`: one page that says what was trained, how well, and whether every export can be trusted.

The report and its pictures are rebuilt from the run folder's files alone (`toolkit report RUN`):

runs/<name>/
  config.json, metrics.jsonl, eval.json, model.safetensors   written by training (toolkit.runs)
  verify.json            the export verification (toolkit.verify.VerifyReport.to_json); optional
  export_manifest.json   a copy of the verified export's manifest.json (file sizes, hashes); optional,
                         else the manifest in the export folder that verify.json names is read if present
  plots/predictions.npz  the first evaluation images with their true and eager-predicted labels; optional
  plots/*.png            written here from the files above
  report.md              written here, last

Plain Markdown with relative image links, so it renders on any Git host. Nothing in it depends on
when it was built, so rebuilding an unchanged run gives the same file.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from toolkit.apps import plots
from toolkit.apps.verify import DEFAULT_ATOL, DEFAULT_RTOL, VerifyReport
from toolkit.artifacts import formats
from toolkit.artifacts.export import default_export_dir
from toolkit.artifacts.manifest import MANIFEST, Manifest
from toolkit.core.errors import CheckpointError, first_line
from toolkit.training.config import RECIPES, TrainConfig, flag_name, leaf_fields
from toolkit.training.evaluate import EvalResult
from toolkit.training.metrics import read_metrics
from toolkit.training.runs import EVAL, MODEL, RunInfo, RunRecord

VERIFY = "verify.json"
EXPORT_MANIFEST = "export_manifest.json"
PLOTS = "plots"
PREDICTIONS = "predictions.npz"
REPORT = "report.md"
TRAINING_PNG = "training.png"
CONFUSION_PNG = "confusion.png"
PER_CLASS_PNG = "per_class.png"
GRID_PNG = "predictions.png"


@dataclass
class RunFiles:
    """Everything the report reads, loaded from one run folder."""

    run_dir: Path
    record: RunRecord  # config.json
    metrics: list[dict[str, Any]]
    evaluation: EvalResult  # eval.json
    verify: VerifyReport | None
    manifest: Manifest | None
    predictions: dict[str, np.ndarray] | None  # images, labels, predictions
    parameters: int | None


def _read(path: Path, reader):
    """A record read from one of the run's JSON files; a damaged file is a one-line error naming it."""
    try:
        return reader(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({first_line(exc)})") from None


def _count_parameters(path: Path) -> int | None:
    """Numbers in the weights file, read from its header without loading the tensors (None: unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    except (SafetensorError, OSError):
        return None


def read_run_files(run_dir: Path) -> RunFiles:
    """Load a finished run's files; raise `CheckpointError` when it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    record = RunRecord.read(run_dir)
    if not (run_dir / EVAL).is_file():
        raise CheckpointError(f"{run_dir}: no {EVAL}, the run did not finish; continue it with "
                              f"`toolkit run --resume latest --output-dir {run_dir}`")
    verify = _read(run_dir / VERIFY, VerifyReport.read) if (run_dir / VERIFY).is_file() else None
    manifest = None
    if (run_dir / EXPORT_MANIFEST).is_file():
        manifest = Manifest.load(run_dir / EXPORT_MANIFEST)
    elif verify is not None and (verify.export_dir / MANIFEST).is_file():
        manifest = Manifest.read(verify.export_dir)
    predictions = None
    if (run_dir / PLOTS / PREDICTIONS).is_file():
        with np.load(run_dir / PLOTS / PREDICTIONS) as saved:
            predictions = {k: saved[k] for k in ("images", "labels", "predictions")}
    return RunFiles(run_dir, record, read_metrics(run_dir), _read(run_dir / EVAL, EvalResult.read), verify, manifest,
                    predictions, _count_parameters(run_dir / MODEL))


def remove_outputs(run_dir: Path) -> None:
    """Delete what `toolkit run` adds to a run folder, so a rerun that fails midway leaves no stale verdict."""
    for name in (VERIFY, EXPORT_MANIFEST, REPORT):
        (Path(run_dir) / name).unlink(missing_ok=True)
    shutil.rmtree(Path(run_dir) / PLOTS, ignore_errors=True)


def save_predictions(run_dir: Path, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> Path:
    """Keep the grid's images and labels in the run folder, so `toolkit report` can redraw it without the data."""
    path = Path(run_dir) / PLOTS / PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=labels, predictions=predictions)
    return path


def per_format_accuracy(run: RunFiles) -> dict[str, dict[str, float]]:
    """Per-class accuracy of eager and every verified format; eager alone (eval.json) when not verified."""
    if run.verify is None:
        return {"eager": run.evaluation.per_class}
    # A program whose hash did not match is never loaded, so it has no numbers to show.
    return {r.name: r.per_class for r in run.verify.results if r.loaded}


def render_plots(run: RunFiles) -> dict[str, str]:
    """Draw every picture the run's files allow; return {picture: path relative to the run folder}."""
    evaluation, folder = run.evaluation, run.run_dir / PLOTS
    classes = evaluation.classes
    plots.plot_training_curves(run.metrics, folder / TRAINING_PNG, final=(evaluation.split, evaluation.accuracy))
    plots.plot_confusion(evaluation.confusion.tolist(), classes, folder / CONFUSION_PNG,
                         title=f"Confusion matrix: {evaluation.n} {evaluation.split} images")
    plots.plot_per_class_accuracy(classes, per_format_accuracy(run), folder / PER_CLASS_PNG)
    drawn = {"training": TRAINING_PNG, "confusion": CONFUSION_PNG, "per_class": PER_CLASS_PNG}
    if run.predictions is not None:
        plots.plot_image_grid(run.predictions["images"], run.predictions["labels"].tolist(),
                              run.predictions["predictions"].tolist(), classes, folder / GRID_PNG)
        drawn["grid"] = GRID_PNG
    return {name: f"{PLOTS}/{file}" for name, file in drawn.items()}


# ---------------------------------------------------------------------------------------------
# Commands to reproduce


def config_flags(config: TrainConfig, output_dir: str) -> list[str]:
    """`toolkit train`/`run` flags that rebuild `config` exactly.

    The recipe, every field it sets (spelled out, so the command survives a retuned recipe) and
    every field that differs from its default. `--resume` is left out: a fresh run reproduces a
    resumed one (resume is bit-exact).
    """
    recipe = config.recipe
    values, defaults = config.flat(), TrainConfig().flat()
    flags = ["--recipe", recipe]
    for _, f in leaf_fields():
        if f.name in ("recipe", "resume"):
            continue
        value = output_dir if f.name == "output_dir" else values[f.name]
        if value is None or (value == defaults[f.name] and f.name not in RECIPES.get(recipe, {})):
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _launcher(info: RunInfo) -> list[str]:
    """`toolkit` for one process; the `accelerate launch` equivalent for several."""
    n = info.num_processes
    if n == 1:
        return ["toolkit"]
    config = "cpu-2proc.yaml" if info.device.startswith("cpu") else "multi-gpu.yaml"
    return ["accelerate", "launch", "--config_file", f"launch/{config}", "--num_processes", str(n), "-m", "toolkit"]


def _shell(*words: str, width: int = 100) -> str:
    """Quoted words on continued lines of at most about `width` characters, a flag kept with its value."""
    groups: list[str] = []
    for word in map(shlex.quote, words):
        if groups and not word.startswith("-") and groups[-1].startswith("-") and " " not in groups[-1]:
            groups[-1] += " " + word
        else:
            groups.append(word)
    lines = [groups[0]]
    for group in groups[1:]:
        if len(lines[-1]) + len(group) + 1 > width:
            lines[-1] += " \\"
            lines.append("    " + group)
        else:
            lines[-1] += " " + group
    return "\n".join(lines)


def reproduce_commands(run: RunFiles) -> list[str]:
    """Shell lines: `toolkit run` with the run's exact settings, then the same as separate steps."""
    config, verify = run.record.config, run.verify
    run_path = config.output_dir or str(run.run_dir)
    train_flags = config_flags(config, run_path)
    export_dir = str(verify.export_dir) if verify else str(default_export_dir(Path(run_path)))
    export_flags = ["--export-dir", export_dir]
    export_step = ["--run", run_path, "--out", export_dir]
    if run.manifest is not None:
        names = [e.format for e in run.manifest.files.values() if e.format in formats.EXPORTABLE]
        if set(names) != set(formats.EXPORTABLE):
            export_flags += ["--formats", ",".join(names)]
            export_step += ["--formats", ",".join(names)]
    tolerance = []
    if verify and (verify.atol, verify.rtol) != (DEFAULT_ATOL, DEFAULT_RTOL):
        tolerance = ["--atol", str(verify.atol), "--rtol", str(verify.rtol)]
    onnx_file = formats.get("onnx").file
    files = [r.file for r in verify.results] if verify else [onnx_file]
    artifact = str(Path(export_dir) / (onnx_file if onnx_file in files else files[-1]))
    launcher = _launcher(run.record.info)
    split = run.evaluation.split

    return [
        "# Everything (train, evaluate, export, verify, report); the run and export folders must not exist yet",
        _shell(*launcher, "run", *train_flags, *export_flags, *tolerance),
        "# The same, step by step",
        _shell(*launcher, "train", *train_flags),
        _shell("toolkit", "export", *export_step),
        _shell("toolkit", "verify", export_dir, "--split", split, "--json-out", str(Path(run_path) / VERIFY), *tolerance),
        _shell("toolkit", "predict", artifact, "IMAGE.png"),
        _shell("toolkit", "report", run_path),
    ]


# ---------------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` is one of l/r per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "--:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def _pct(x: float, digits: int = 1) -> str:
    return "not run" if x != x else f"{100 * x:.{digits}f} %"  # nan: a format that was not run


def _verdict(verify: VerifyReport | None) -> str:
    if verify is None:
        return "not exported and verified (no verify.json)"
    names = [r.name for r in verify.results if r.name != formats.EAGER.name]
    if verify.passed:
        return f"all {len(names)} exported formats ({', '.join(names)}) match the eager model"
    failed = [r.name for r in verify.results if not r.passed]
    return f"**FAILED**: {', '.join(failed)} differ(s) from the eager model"


def _summary(run: RunFiles) -> list[str]:
    config, info, evaluation = run.record.config, run.record.info, run.evaluation
    data, optim = info.data, config.optim
    steps = [m for m in run.metrics if m["kind"] == "step"]
    seconds = run.metrics[-1]["train_seconds"] if run.metrics else None
    speed = statistics.median(m["images_per_s"] for m in steps) if steps else None
    processes = (f"{info.num_processes} ({info.distributed_type}) on {info.device}, "
                 f"{info.torch_threads} torch thread(s) each")
    rows = [
        ["Model", f"`{config.model}`" + (f", {run.parameters:,} parameters" if run.parameters else "")],
        ["Recipe", f"`{config.recipe}`: {config.epochs} epochs, SGD lr {optim.lr:g} "
                   f"(schedule {optim.schedule}), momentum {optim.momentum:g}"
                   + (" Nesterov" if optim.nesterov else "")
                   + f", weight decay {optim.weight_decay:g}, label smoothing {optim.label_smoothing:g}, "
                   f"augmentation {'on' if config.data.augment else 'off'}"],
        ["Data", f"{data.source}: {data.train} train / {data.val} val images, "
                 f"{evaluation.n} {evaluation.split} images evaluated, {len(data.classes)} classes"],
        ["Batch", f"{config.batch_size} per process, global {info.global_batch_size}; "
                  f"{info.total_steps} optimizer steps ({info.steps_per_epoch} per epoch)"],
        ["Processes", processes],
        ["Precision", f"mixed precision `{info.mixed_precision}`, weights and exports fp32"],
        ["Training time", f"{seconds:.1f} s" if seconds is not None else "unknown (no metrics)"],
        ["Throughput", f"{speed:,.0f} images/s (median over logged intervals)" if speed else "unknown (no metrics)"],
        ["Exports", _verdict(run.verify)],
        ["Versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())],
    ]
    return _table(["", ""], rows, "ll")


def _accuracy(run: RunFiles, pictures: dict[str, str]) -> list[str]:
    ev = run.evaluation
    # The same text `toolkit train` and `toolkit evaluate` print: the tutorial's lines plus the matrix.
    lines = [f"## Accuracy ({ev.split} split, final weights)", "", "```text", ev.format(), "```", ""]
    if ev.loss is not None:
        lines += [f"Mean {ev.split} loss: {ev.loss:.4f}", ""]
    if data_note := run.record.info.data.eval_note:
        lines += [f"Note: {data_note}.", ""]
    return lines + [f"![Confusion matrix]({pictures['confusion']})", ""]


def _training(run: RunFiles, pictures: dict[str, str]) -> list[str]:
    epochs = [m for m in run.metrics if m["kind"] == "epoch"]

    def maybe(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    rows = [[str(m["epoch"]), str(m["step"]), f"{m['train_loss']:.4f}", maybe(m["val_loss"], ".4f"),
             "–" if m["val_accuracy"] is None else _pct(m["val_accuracy"]), f"{m['train_seconds']:.1f}"]
            for m in epochs]
    return (["## Training", "", f"![Loss, learning rate and accuracy]({pictures['training']})", ""]
            + _table(["epoch", "step", "train loss", "val loss", "val accuracy", "training s"], rows) + [""])


def _exports(run: RunFiles, pictures: dict[str, str]) -> list[str]:
    verify = run.verify
    lines = ["## Exports", ""]
    if verify is None:
        lines += ["Not exported and verified: this run folder has no verify.json (`toolkit run` writes it).", "",
                  f"![Per-class accuracy]({pictures['per_class']})", ""]
        return lines
    files = run.manifest.files if run.manifest else {}
    reduced = [f"{r.name} when its {r.tolerance}" for r in verify.results if formats.by_accuracy(r.name)]
    lines += [f"`{verify.export_dir}` checked against the eager model on all {verify.n} {verify.split} images; "
              f"an fp32 format passes when {verify.logit_tolerance.describe()} "
              "and no confident prediction flips"
              + "".join(f", {line} (reduced precision)" for line in reduced)
              + "; every file's sha256 must match the manifest.", ""]
    if verify.note:
        lines += [f"Note: {verify.note}.", ""]
    rows = []
    for r in verify.results:
        entry = files.get(r.file)
        size = f"{entry.size / 1024:,.1f} KiB" if entry and entry.size is not None else "?"
        sha = f"`{entry.sha256[:12]}`" if entry and entry.sha256 else "?"
        rows.append([r.name, f"`{r.file}`", size, sha, "not run" if not r.loaded else f"{r.max_abs_diff:.2e}",
                     _pct(r.agreement, 2), _pct(r.accuracy), "ok" if r.passed else "**FAIL**"])
    lines += _table(["format", "file", "size", "sha256", "max abs Δlogit", "agreement", "accuracy", "result"], rows,
                    "llrlrrrl")
    lines.append("")
    for r in verify.results:
        lines += [f"- **FAIL** {r.name} (`{r.file}`): {reason}" for reason in r.failures]
    if not verify.passed:
        lines.append("")
    per_format = per_format_accuracy(run)
    lines += _table(["class", *per_format], [[c, *(_pct(acc[c]) for acc in per_format.values())]
                                             for c in verify.classes])
    return lines + ["", f"![Per-class accuracy, eager next to each exported format]({pictures['per_class']})", ""]


def _grid(run: RunFiles, pictures: dict[str, str]) -> list[str]:
    if "grid" not in pictures:
        return []
    p = run.predictions
    wrong = int((p["labels"] != p["predictions"]).sum())
    return ["## Test images", "",
            f"{len(p['labels'])} {run.evaluation.split} images (evenly spaced over the split) with their true class and the eager "
            f"model's prediction; {wrong} mistake(s), framed in red.", "",
            f"![Test images with true and predicted labels]({pictures['grid']})", ""]


def render_markdown(run: RunFiles, pictures: dict[str, str]) -> str:
    ev = run.evaluation
    lines = [f"# Run `{run.run_dir.name}`", "",
             f"**{_pct(ev.accuracy)}** accuracy on {ev.n} {ev.split} images; exports: {_verdict(run.verify)}.",
             "", "## Summary", "", *_summary(run), "",
             *_accuracy(run, pictures), *_training(run, pictures), *_exports(run, pictures), *_grid(run, pictures),
             "## Reproduce", "", "```sh", *reproduce_commands(run), "```", "",
             "<details><summary>config.json</summary>", "", "```json", json.dumps(run.record.to_json(), indent=2), "```", "",
             "</details>", ""]
    return "\n".join(lines)


def build_report(run_dir: Path) -> Path:
    """Redraw the pictures and write `report.md` from the run folder's files; return the report's path."""
    run = read_run_files(Path(run_dir))
    pictures = render_plots(run)
    path = run.run_dir / REPORT
    path.write_text(render_markdown(run, pictures))
    return path

"""`toolkit run`: one command from data to a verified, documented model.

    train (which evaluates on the test split and writes eval.json)
    -> export every format -> verify each against the eager model -> pictures -> report.md

Under `accelerate launch` every process trains; only the main process exports, verifies and
writes, while the others return as soon as training is done. A failed verification still gets its
report (showing the failure) before `VerificationError` makes the exit code non-zero.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from toolkit.apps.report import EXPORT_MANIFEST, PLOTS, VERIFY, build_report, remove_outputs, save_predictions
from toolkit.apps.verify import verify_and_report
from toolkit.artifacts import formats
from toolkit.artifacts.export import default_export_dir, export_run
from toolkit.artifacts.manifest import MANIFEST, Manifest
from toolkit.core.errors import ArtifactError, ConfigError, VerificationError
from toolkit.training.accelerator import open_run
from toolkit.training.config import TrainConfig
from toolkit.training.data import load_splits, normalize
from toolkit.training.runs import EVAL, MODEL, load_model
from toolkit.training.train import TrainResult, train

GRID_IMAGES = 32  # evaluation images shown with their predictions in the report


def _export_belongs_to(export_dir: Path, run_dir: Path) -> bool:
    """True when `export_dir` holds an earlier export of this same run (safe to replace on a rerun)."""
    try:
        return Manifest.read(export_dir).source.run == str(run_dir.resolve())
    except ArtifactError:
        return False


def _check_export_dir(export_dir: Path | None, output_dir: str | None) -> None:
    """Refuse, before spending time on training, an export folder that holds something else."""
    if export_dir is None and output_dir is None:
        return  # both names derive from a fresh timestamp
    run_dir = Path(output_dir) if output_dir else None
    target = export_dir or default_export_dir(run_dir)
    if target.exists() and not (run_dir and _export_belongs_to(target, run_dir)):
        raise ConfigError(f"--export-dir {target}: already exists and is not an export of this run; "
                          "choose another --export-dir or remove it")


def save_grid_predictions(run_dir: Path, cfg: TrainConfig, split: str, count: int = GRID_IMAGES) -> Path:
    """The eager model's predictions on `count` evaluation images, saved for the report's grid."""
    trained = load_model(run_dir / MODEL, model=cfg.model)
    held, _ = load_splits(cfg.data).held_out(split)
    # Evenly spaced over the split, so that a split stored class by class still shows every class.
    index = torch.linspace(0, len(held) - 1, min(count, len(held))).round().long().unique()
    images, labels = held.images[index], held.labels[index]
    with torch.inference_mode():
        predictions = trained.model(normalize(images)).argmax(dim=1)
    return save_predictions(run_dir, images.numpy(), labels.numpy(), predictions.numpy().astype(np.int64))


def run_pipeline(cfg: TrainConfig, export_dir: Path | None = None, names: Sequence[str] = formats.EXPORTABLE,
                 atol: float | None = None, rtol: float | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Train, export, verify, draw and report; return the run folder.

    `export_dir` defaults to exports/<run folder name>. An existing export of the same run (a rerun
    with `--resume latest` or `--overwrite`) is replaced; any other existing folder is refused before training.
    """
    negative = [f"--{flag} {value:g}" for flag, value in (("atol", atol), ("rtol", rtol)) if value is not None and value < 0]
    if negative:  # None: the default rule, scaled with the model (toolkit.apps.verify)
        raise ConfigError(f"{', '.join(negative)}: must be >= 0")
    _check_export_dir(export_dir, cfg.output_dir)
    # The run folder stays locked, and status.json records the whole command (a failed verification too).
    with open_run(cfg, "toolkit run") as session:
        result = train(cfg, session)
        # train() ended the process group; the state still knows which process this is.
        if not PartialState().is_main_process:
            return result.run_dir
        return _publish(result, cfg, export_dir, names, atol, rtol, log)


def _publish(result: TrainResult, cfg: TrainConfig, export_dir: Path | None, names: Sequence[str],
             atol: float | None, rtol: float | None, log: Callable[[str], None]) -> Path:
    """Export, verify, draw and report a trained run (main process only)."""
    run_dir = result.run_dir
    remove_outputs(run_dir)  # a rerun (--resume latest, --overwrite) replaces them all
    target = export_dir or default_export_dir(run_dir)
    export_dir = export_run(run_dir, target, names, overwrite=_export_belongs_to(target, run_dir), log=log,
                            model=cfg.model)
    shutil.copyfile(export_dir / MANIFEST, run_dir / EXPORT_MANIFEST)
    split = result.evaluation.split  # where train() evaluated: test, or val when the data has no test split
    failure: VerificationError | None = None
    try:
        verify_and_report(export_dir, None, split, atol, rtol, json_out=run_dir / VERIFY, threads=cfg.threads,
                          log=log, model=cfg.model)
    except VerificationError as exc:
        failure = exc  # reported after the report is written, so the failure is documented too
    save_grid_predictions(run_dir, cfg, split)
    report = build_report(run_dir)

    verdict = "FAILED" if failure else "passed"
    log("\n".join([
        "toolkit run: done" if not failure else "toolkit run: done, but verification FAILED",
        f"  run folder    {run_dir}",
        f"  weights       {run_dir / MODEL}",
        f"  evaluation    {run_dir / EVAL}",
        f"  exports       {export_dir} ({', '.join(sorted(p.name for p in export_dir.iterdir()))})",
        f"  verification  {run_dir / VERIFY} ({verdict})",
        f"  pictures      {run_dir / PLOTS} ({', '.join(sorted(p.name for p in (run_dir / PLOTS).glob('*.png')))})",
        f"  report        {report}",
    ]))
    if failure is not None:
        raise failure
    return run_dir

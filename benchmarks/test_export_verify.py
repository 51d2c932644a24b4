"""Seconds to export each format, and to verify every format over 10,000 images.

- `test_export[format]`: `toolkit.artifacts.export.export_run(run, out, formats=[format])` on the benchmark
  model (the library call behind `toolkit export`): loading the run's weights, writing that one
  format, the eager weights and manifest.json, hashing them. TorchScript (`torch.jit.script`), ONNX
  (the torch.export-based exporter + `onnx.checker` full check), ONNX fp16 and int8 (each including
  the fp32 ONNX export it derives from; int8 also loading the run's training split and calibrating
  on 512 of its images) and torch.export (.pt2). Three timed exports per format after one warm-up
  (imports and first-use compilation are a one-off cost of a process, not of an export); all cores.
- `test_verify`: `toolkit.apps.verify.verify_export` over 10,000 held-out images (the real split's 20 %
  hold-out when present, else 10,000 synthetic test images): every format of the registry runs all
  images (batches of 500) and is compared with eager (fp16 and int8 by accuracy). Threads: all cores.
  images_per_s counts images through all formats. Three timed runs.

With benchmarking disabled each runs once on the tiny model and 200 images.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import THREADS_ALL, Scale, median_seconds, pinned_threads
from benchmarks.conftest import Trained
from benchmarks.model_rows import TRAINED_MODEL
from toolkit.artifacts import formats
from toolkit.artifacts.export import export_run
from toolkit.artifacts.manifest import Manifest
from toolkit.apps.verify import verify_export


@pytest.mark.parametrize("fmt", formats.EXPORTABLE)
def test_export(benchmark, trained: Trained, scale: Scale, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"export-{fmt}"
    lines: list[str] = []

    def export() -> Path:
        return export_run(trained.run, out, [fmt], overwrite=True, log=lines.append)

    benchmark.group = "export"
    benchmark.extra_info.update(kind="export", model=TRAINED_MODEL, label=f"export {fmt}", format=fmt,
                                threads=THREADS_ALL)
    with pinned_threads(THREADS_ALL):
        if benchmark.enabled:
            benchmark.pedantic(export, rounds=scale.export_rounds, warmup_rounds=1)
        else:
            benchmark.pedantic(export)
    file = formats.get(fmt).file
    manifest = Manifest.read(out)
    assert file in manifest.files
    benchmark.extra_info.update(file=file, bytes=manifest.files[file].size, notes=manifest.notes)


def test_verify(benchmark, trained: Trained, scale: Scale) -> None:
    def verify():
        return verify_export(trained.export, trained.verify_overrides, trained.verify_split, threads=THREADS_ALL)

    benchmark.group = "verify"
    with pinned_threads(THREADS_ALL):
        report = benchmark.pedantic(verify, rounds=scale.verify_rounds)
    assert report.passed, report.format()
    formats = [r.name for r in report.results]
    benchmark.extra_info.update(kind="verify", model=TRAINED_MODEL,
                                label=f"verify {len(formats)} formats on {report.n} images",
                                images=report.n, formats=formats, split=report.split, threads=THREADS_ALL,
                                max_abs_diff={r.name: r.max_abs_diff for r in report.results})
    median = median_seconds(benchmark)
    if median is not None:
        # Images through every format, the verify command's real work per second.
        benchmark.extra_info["images_per_s"] = report.n * len(formats) / median

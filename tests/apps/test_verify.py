"""toolkit.apps.verify: every format against eager over a whole split; tampered files must fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from tests.helpers import CLASSES, EXACT, Export, assert_clean_error, assert_ok, cli, edit_onnx, rehash
from toolkit.core.files import sha256_file
from toolkit.apps.verify import VerifyReport, compare, verify_export
from toolkit.artifacts.formats import FORMATS, NOISE_FACTOR, AccuracyTolerance

ROWS = [f.name for f in FORMATS]
REDUCED = [f.name for f in FORMATS if f.name not in EXACT]  # fp16, int8: held to eager's accuracy


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.fixture
def copy(exported: Export, tmp_path: Path) -> Path:
    """A private copy of the export folder, free to tamper with."""
    return Path(shutil.copytree(exported.dir, tmp_path / "export"))


def test_verify_passes_on_a_true_export_and_writes_nothing_there(exported: Export, tmp_path: Path, capsys) -> None:
    before = _snapshot(exported.dir)
    proc = cli(capsys, "verify", exported.dir, "--json-out", tmp_path / "verify.json")
    assert_ok(proc)
    assert _snapshot(exported.dir) == before
    table = proc.stdout.splitlines()
    header = next(l for l in table if l.startswith("format"))
    assert header.split()[:4] == ["format", "max|Δlogit|", "agree", "%"] and all(c in header for c in CLASSES)
    rows = {l.split()[0]: l.split() for l in table if l.split() and l.split()[0] in ROWS}
    assert list(rows) == ROWS
    assert all(len(r) == 1 + 3 + 10 + 1 and r[-1] == "ok" for r in rows.values())  # 10 per-class columns
    # Under each reduced-precision row, its per-class agreement with eager.
    agreement_rows = [l.split() for l in table if l.startswith("  agree %")]
    assert len(agreement_rows) == len(REDUCED) and all(len(r) == 2 + 10 for r in agreement_rows)
    # The tutorial net's fp32 noise is far below the floor: the floor is the bound.
    assert ("  fp32 formats: |Δlogit| <= 0.0001 + 0.0001·|eager| (max of 0.0001 and 10× the model's fp32 noise "
            in "\n".join(table))
    assert "  onnx-int8: accuracy within 1 pp of eager, 3 pp per class (at least one image) (reduced precision)" in table
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] and report["split"] == "test" and report["n"] == 200 and report["provider"] == "auto"
    assert 0 < report["fp32_noise"] < 1e-5 and report["effective_atol"] == report["atol"] == 1e-4
    assert list(report["formats"]) == ROWS
    eager = report["formats"]["eager"]
    assert eager["accuracy"] >= 0.9  # the fixture's model learned the synthetic classes
    for name, r in report["formats"].items():
        assert r["passed"] and r["failures"] == [] and r["sha256_matches_manifest"] is True, name
        assert r["provider"] == "cpu" and list(r["per_class"]) == list(r["per_class_agreement"]) == CLASSES
        if name in EXACT:
            assert r["agreement"] == 1.0 and r["max_abs_logit_diff"] <= 1e-4
            assert r["accuracy"] == eager["accuracy"] and r["per_class"] == eager["per_class"], name
        else:  # the synthetic classes are far apart: even int8 agrees with eager on nearly every image
            assert r["agreement"] >= 0.98 and abs(r["accuracy"] - eager["accuracy"]) <= 0.01, name
            assert r["tolerance"] == FORMATS[ROWS.index(name)].tolerance.describe()


def test_verify_fails_on_a_tampered_onnx_weight(copy: Path, tmp_path: Path, capsys) -> None:
    def shift_a_bias(model) -> None:
        bias = next(t for t in model.graph.initializer if t.name == "fc3.bias")
        values = numpy_helper.to_array(bias).copy()
        values[3] += 5.0  # class3 wins far more often
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))

    edit_onnx(copy / "model.onnx", shift_a_bias)
    # 1. As shipped: the hash no longer matches, and the numbers are reported anyway.
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert proc.returncode == 3
    assert_clean_error(proc, "onnx", "worst sample")
    formats = json.loads((tmp_path / "v.json").read_text())["formats"]
    failures = formats["onnx"]["failures"]
    assert formats["onnx"]["sha256_matches_manifest"] is False and "sha256 differs" in failures[0]
    assert all(formats[f]["passed"] for f in ROWS if f != "onnx")
    # 2. With the manifest updated to the tampered file, the numerics alone fail it.
    rehash(copy, "model.onnx")
    before = _snapshot(copy)
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert proc.returncode == 3 and _snapshot(copy) == before
    assert_clean_error(proc, "onnx", "max |Δlogit|", "worst sample")
    onnx_row = next(l for l in proc.stdout.splitlines() if l.startswith("onnx"))
    assert onnx_row.endswith("FAIL") and "FAIL onnx (model.onnx): " in proc.stdout
    result = json.loads((tmp_path / "v.json").read_text())["formats"]["onnx"]
    assert result["sha256_matches_manifest"] is True and not result["passed"]
    assert result["max_abs_logit_diff"] >= 4.9 and result["agreement"] < 1.0
    assert any("top-2 margin" in f for f in result["failures"])
    assert f"worst sample {result['worst_sample']} " in result["failures"][0]


def test_verify_fails_on_wrong_normalization_metadata(copy: Path, tmp_path: Path, capsys) -> None:
    def wrong_std(model) -> None:
        for prop in model.metadata_props:
            if prop.key == "std":
                prop.value = json.dumps([0.25, 0.25, 0.25])

    edit_onnx(copy / "model.onnx", wrong_std)
    rehash(copy, "model.onnx")
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert_clean_error(proc, "onnx", "max |Δlogit|")
    formats = json.loads((tmp_path / "v.json").read_text())["formats"]
    assert not formats["onnx"]["passed"] and formats["onnx"]["max_abs_logit_diff"] > 1e-2
    assert all(formats[f]["passed"] for f in ROWS if f != "onnx")


def test_verify_works_without_the_source_run_folder(copy: Path, capsys) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["run"] = str(copy.parent / "deleted-run")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = cli(capsys, "verify", copy, "--data", "synthetic", "--split", "val")
    assert_ok(proc)
    assert "val split, 50 images" in proc.stdout


def test_verify_refuses_to_write_json_over_an_artifact(copy: Path, capsys) -> None:
    before = _snapshot(copy)
    assert_clean_error(cli(capsys, "verify", copy, "--json-out", copy / "manifest.json"),
                       "--json-out", "would overwrite")
    assert _snapshot(copy) == before


@pytest.mark.parametrize("problem", ["missing folder", "no manifest", "broken manifest", "missing file"])
def test_verify_bad_export_folders(copy: Path, capsys, problem: str) -> None:
    fragments = [str(copy)]
    if problem == "missing folder":
        shutil.rmtree(copy)
        fragments.append("no such export folder")
    elif problem == "no manifest":
        (copy / "manifest.json").unlink()
        fragments.append("not an export folder")
    elif problem == "broken manifest":
        (copy / "manifest.json").write_text("{ truncated")
        fragments.append("unreadable manifest")
    else:
        (copy / "model.pt2").unlink()
        fragments = [str(copy / "model.pt2"), "no such file"]
    assert_clean_error(cli(capsys, "verify", copy), *fragments)


def test_compare_tolerates_flips_within_the_tolerance_only() -> None:
    labels = np.array([0, 1])
    reference = np.array([[1.0, 1.00005, 0.0], [0.0, 3.0, 1.0]])
    # Sample 0: eager's top-2 margin (5e-5) is inside the tolerance, so a flip there is rounding noise.
    near_tie = np.array([[1.00005, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=np.float32)
    result = compare("x", "f", near_tie, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=1e-4)
    assert result.passed and result.agreement == 0.5 and result.accuracy == 1.0
    assert result.per_class == {"a": 1.0, "b": 1.0, "c": 0.0}
    # Sample 1: every logit moves by at most 1.1, inside atol 1.2, but eager's margin (2.0) exceeds
    # the tolerance, so the flip is a failure on its own.
    flipped = np.array([[1.0, 1.00005, 0.0], [0.0, 1.9, 2.0]], dtype=np.float32)
    result = compare("x", "f", flipped, reference, labels, ["a", "b", "c"], atol=1.2, rtol=0.0)
    assert not result.passed and len(result.failures) == 1
    assert "top-2 margin" in result.failures[0] and "worst sample 1 " in result.failures[0]
    # Outside the tolerance: the worst sample is named.
    result = compare("x", "f", flipped, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=1e-4)
    assert result.worst_sample == 1 and "exceeds the tolerance on 1 of 2 images; worst sample 1" in result.failures[0]


def test_the_fp32_bound_scales_with_the_models_measured_noise_and_given_flags_fix_it() -> None:
    """Δlogit 5e-4: outside the 1e-4 floor, inside 10× a measured noise of 1e-4; `--atol` replaces the rule."""
    labels = np.zeros(4, dtype=np.int64)
    reference = np.tile([3.0, 1.0, 0.0], (4, 1))
    moved = (reference + 5e-4).astype(np.float32)
    assert not compare("x", "f", moved, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=0.0).passed
    scaled = compare("x", "f", moved, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=0.0, fp32_noise=1e-4)
    assert scaled.passed and f"max of 0.0001 and {NOISE_FACTOR:g}× the model's fp32 noise" in scaled.tolerance
    # Never below the floor: a tiny measured noise leaves the fixed bound.
    assert not compare("x", "f", moved, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=0.0, fp32_noise=1e-9).passed


def test_fp32_formats_must_agree_on_999_in_1000_predictions() -> None:
    """Near-tie flips (inside the logit bound) are rounding noise, but at most 0.1 % of images (at least one)."""
    labels = np.zeros(2000, dtype=np.int64)
    reference = np.tile([1.0, 1.00005, 0.0], (2000, 1))
    for flips, passed in ((2, True), (3, False)):
        logits = reference.astype(np.float32)
        logits[:flips] = [1.00005, 1.0, 0.0]
        result = compare("x", "f", logits, reference, labels, ["a", "b", "c"], atol=1e-4, rtol=1e-4)
        assert result.passed is passed, flips
    assert "99.85 % of the images (3 differ, 2 allowed)" in result.failures[0]


def test_given_atol_or_rtol_replace_the_scaled_bound(exported: Export, tmp_path: Path, capsys) -> None:
    assert verify_export(exported.dir).fp32_noise is not None
    assert_ok(cli(capsys, "verify", exported.dir, "--atol", "1e-3", "--json-out", tmp_path / "v.json"))
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["fp32_noise"] is None and report["atol"] == report["effective_atol"] == 1e-3
    assert report["rtol"] == 1e-4  # the one not given keeps its default
    assert_clean_error(cli(capsys, "verify", exported.dir, "--rtol", "-1"), "--atol/--rtol: must be >= 0")


@pytest.mark.parametrize("program", ["model.ts", "model.pt2"])
def test_a_changed_program_file_is_not_loaded(copy: Path, tmp_path: Path, capsys, monkeypatch, program: str) -> None:
    """.ts and .pt2 files are programs: with a sha256 that differs from the manifest, verify never loads them."""
    import toolkit.apps.verify

    loaded: list[str] = []
    real = toolkit.apps.verify.load_backend

    def spy(path, *args, **kwargs):
        loaded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(toolkit.apps.verify, "load_backend", spy)
    with open(copy / program, "ab") as f:
        f.write(b"\0")  # still a valid zip, but not the exported bytes
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert proc.returncode == 3 and program not in loaded and len(loaded) == len(ROWS) - 1, loaded
    row = {"model.ts": "torchscript", "model.pt2": "pt2"}[program]
    assert_clean_error(proc, row, "not loaded", "program", str(copy / program))
    assert next(l for l in proc.stdout.splitlines() if l.startswith(row)).endswith("FAIL")
    result = json.loads((tmp_path / "v.json").read_text())["formats"][row]
    assert result["sha256_matches_manifest"] is False and result["max_abs_logit_diff"] is None
    assert result["accuracy"] is None and set(result["per_class"].values()) == {None}
    others = [r for name, r in json.loads((tmp_path / "v.json").read_text())["formats"].items() if name != row]
    assert len(others) == len(ROWS) - 1 and all(r["passed"] for r in others)


def test_run_backend_stays_below_the_backends_max_batch(exported: Export) -> None:
    from toolkit.artifacts.backends import load_backend
    from toolkit.apps.verify import run_backend

    backend = load_backend(exported.dir / "model.onnx", max_batch=4)
    sizes: list[int] = []
    real = backend.predict_logits
    backend.predict_logits = lambda x: sizes.append(len(x)) or real(x)  # type: ignore[method-assign]
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    assert run_backend(backend, images).shape == (10, 10) and sizes == [4, 4, 2]


def _shift_class3(initializer: str, by: float):
    """An edit that adds `by` to class3's entry of a bias initializer (of any float type)."""
    def edit(model) -> None:
        bias = next(t for t in model.graph.initializer if t.name == initializer)
        values = numpy_helper.to_array(bias).copy()
        values[3] += values.dtype.type(by)
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    return edit


@pytest.mark.parametrize("file, initializer, shift", [
    ("model.fp16.onnx", "fc3.bias", 5.0),
    ("model.int8.onnx", "fc3.bias_quantized", 2 ** 20),  # int32, in units of input scale × weight scale
])
def test_verify_fails_on_a_tampered_fp16_or_int8_file(copy: Path, tmp_path: Path, capsys, file: str,
                                                      initializer: str, shift: float) -> None:
    """Reduced-precision files are held to eager's accuracy: a changed file fails by its hash as shipped, and by its
    accuracy once the manifest is made to match; a file that no longer loads fails too. Never a traceback."""
    row = next(f.name for f in FORMATS if f.file == file)
    edit_onnx(copy / file, _shift_class3(initializer, shift))
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert proc.returncode == 3
    assert_clean_error(proc, row, "sha256 differs")
    rehash(copy, file)
    proc = cli(capsys, "verify", copy, "--json-out", tmp_path / "v.json")
    assert proc.returncode == 3
    assert_clean_error(proc, row, "accuracy", "differs from eager's", "pp allowed")
    result = json.loads((tmp_path / "v.json").read_text())["formats"][row]
    assert not result["passed"] and result["sha256_matches_manifest"] is True and result["agreement"] < 0.95
    assert result["per_class_agreement"]["class3"] == 1.0  # class3 wins wherever eager already said class3
    assert all(r["passed"] for name, r in json.loads((tmp_path / "v.json").read_text())["formats"].items()
               if name != row)
    (copy / file).write_bytes((copy / file).read_bytes()[:1000])  # truncated: not loadable at all
    assert_clean_error(cli(capsys, "verify", copy), str(copy / file), "not a loadable ONNX model")


def test_compare_holds_reduced_precision_to_eager_accuracy() -> None:
    """fp16/int8: logits may differ; accuracy must stay within the tolerance overall and for every class, where
    one image is always allowed."""
    classes = ["a", "b"]
    labels = np.array([0] * 50 + [1] * 50)
    reference = np.zeros((100, 2))
    reference[np.arange(100), labels] = 5.0  # eager: every image right
    tolerance = AccuracyTolerance(overall_pp=1.0, per_class_pp=3.0)
    noisy = (reference + 0.4).astype(np.float32)  # far outside the logit tolerance, same predictions
    result = compare("int8", "f", noisy, reference, labels, classes, 1e-4, 1e-4, True, tolerance)
    assert result.passed and result.tolerance == "accuracy within 1 pp of eager, 3 pp per class (at least one image)"
    flipped = noisy.copy()
    flipped[0] = [0.0, 5.0]  # one class-a image wrong: -1 pp overall (at the limit), -2 pp for class a
    assert compare("int8", "f", flipped, reference, labels, classes, 1e-4, 1e-4, True, tolerance).passed
    flipped[1] = [0.0, 5.0]  # two: -2 pp overall, -4 pp for class a
    result = compare("int8", "f", flipped, reference, labels, classes, 1e-4, 1e-4, True, tolerance)
    assert result.failures == [
        "accuracy 98.00 % differs from eager's 100.00 % by -2.00 pp, more than the 1 pp allowed for int8",
        "per-class accuracy differs from eager's by more than allowed for int8 in 1 class(es); "
        "worst a: 96.0 % vs 100.0 % (-4.0 pp, 3 pp allowed)"]
    assert result.per_class_agreement == {"a": 0.96, "b": 1.0} and result.agreement == 0.98
    # 10 images (5 per class): one changed prediction is 10 pp overall and 20 pp for its class, and passes.
    small = compare("int8", "f", flipped[[0, 2, 3, 4, 5, 50, 51, 52, 53, 54]], reference[[0, 2, 3, 4, 5, 50, 51, 52, 53, 54]],
                    labels[[0, 2, 3, 4, 5, 50, 51, 52, 53, 54]], classes, 1e-4, 1e-4, True, tolerance)
    assert small.passed and small.accuracy == 0.9


def test_old_verify_json_without_providers_or_agreement_still_reads(tmp_path: Path) -> None:
    """verify.json written before fp16/int8 (no provider, tolerance or per_class_agreement) is read back."""
    old = {"export_dir": "exports/x", "split": "test", "n": 2, "classes": ["a"], "atol": 1e-4, "rtol": 1e-4,
           "passed": True, "note": None, "formats": {"onnx": {
               "file": "model.onnx", "passed": True, "max_abs_logit_diff": 0.0, "agreement": 1.0, "accuracy": 1.0,
               "per_class": {"a": 1.0}, "worst_sample": 0, "sha256_matches_manifest": True, "failures": []}}}
    (tmp_path / "verify.json").write_text(json.dumps(old))
    report = VerifyReport.read(tmp_path / "verify.json")
    assert report.provider == "auto" and report.results[0].provider is None and report.results[0].tolerance == ""
    assert VerifyReport.from_json(report.to_json()).to_json() == report.to_json()


def test_verify_on_a_provider_this_machine_lacks_is_one_line(copy: Path, capsys) -> None:
    assert_clean_error(cli(capsys, "verify", copy, "--provider", "cuda"), "--provider cuda",
                       "has no CUDAExecutionProvider")


def test_verify_with_tta_runs_every_format_on_the_same_views(exported: Export, tmp_path: Path, capsys) -> None:
    proc = cli(capsys, "verify", exported.dir, "--tta", "flip-translate", "--json-out", tmp_path / "verify.json")
    assert_ok(proc)
    assert proc.stdout.splitlines()[0].endswith(", test-time augmentation flip-translate")
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] and report["tta"] == "flip-translate" and list(report["formats"]) == ROWS
    # The views change eager's logits, so its reference is the averaged one: the fp32 formats still match it.
    plain = VerifyReport.read(tmp_path / "verify.json")
    assert plain.tta == "flip-translate"
    for name in EXACT:
        assert report["formats"][name]["agreement"] == 1.0, name

"""toolkit.artifacts.export: the files, their metadata, the manifest, and each file in a process with only its runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.helpers import CLASSES, FILES, Export, assert_clean_error, assert_like_eager, assert_ok, cli
from toolkit.artifacts.backends import load_backend
from toolkit.artifacts.manifest import Manifest
from toolkit.artifacts.metadata import METADATA_KEYS, OPTIONAL_KEYS, ArtifactMetadata
from toolkit.core.files import sha256_file
from toolkit.core.images import MEAN, STD

EXPECTED_METADATA = {"class_names": CLASSES, "mean": list(MEAN), "std": list(STD), "input_layout": "NCHW",
                     "model": "tutorial"}


def _batches() -> dict[int, np.ndarray]:
    g = np.random.default_rng(0)
    return {n: g.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 7, 64)}


def test_export_writes_every_format_and_a_complete_manifest(exported: Export) -> None:
    names = {p.name for p in exported.dir.iterdir()}
    # One self-contained file per format: no `.onnx.data` or other external-data file.
    assert names == {"model.ts", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.pt2", "model.safetensors",
                     "manifest.json"} == {*FILES.values(), "manifest.json"}
    manifest = json.loads((exported.dir / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["size"] == (exported.dir / name).stat().st_size
        assert entry["sha256"] == sha256_file(exported.dir / name)
    assert {e["format"]: e["precision"] for e in manifest["files"].values()} == {
        "torchscript": "fp32", "onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8", "pt2": "fp32", "eager": "fp32"}
    assert manifest["files"]["model.ts"]["method"] == "script"
    assert manifest["files"]["model.onnx"]["exporter"] == "dynamo"
    assert manifest["opset"] >= 18 and manifest["files"]["model.onnx"]["opset"] == manifest["opset"]
    assert manifest["input"] == {**manifest["input"], "name": "images", "shape": ["N", 3, 32, 32], "dtype": "float32"}
    assert manifest["output"]["name"] == "logits" and manifest["output"]["shape"] == ["N", 10]
    assert manifest["class_names"] == CLASSES and manifest["mean"] == list(MEAN) and manifest["std"] == list(STD)
    assert manifest["source"]["run"] == str(exported.run.resolve())
    assert manifest["source"]["sha256"] == sha256_file(exported.run / "model.safetensors")
    assert manifest["source"]["checkpoint"] is None and manifest["precision"] == "fp32"
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}


def test_deprecation_warnings_are_one_line(exported: Export) -> None:
    """torch's deprecation warnings during export (which ones depends on the torch release) are one note line each."""
    lines = exported.log.splitlines()
    deprecated = [l for l in lines if "deprecated" in l]
    assert any("torch.jit.script" in l for l in deprecated), exported.log
    assert all(l.startswith("export: note: ") for l in deprecated), exported.log
    assert len(deprecated) == len(set(deprecated))  # each distinct warning once
    assert "Traceback" not in exported.log and "warnings.warn" not in exported.log


def test_onnx_file_is_checked_self_contained_and_dynamic(exported: Export) -> None:
    path = exported.dir / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and out.name == "logits"
    assert isinstance(dims[0], str) and dims[0] and dims[1:] == [3, 32, 32]


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "onnx-int8"])
def test_onnx_loads_with_only_onnxruntime(exported: Export, tmp_path: Path, fmt: str) -> None:
    """A client with onnxruntime (no torch) and the one file can label images: batches 1, 7, 64. The fp16 and
    int8 files take and give the same fp32 tensors as model.onnx and carry the same metadata."""
    batches = _batches()
    for n, x in batches.items():
        np.save(tmp_path / f"x{n}.npy", x)
    snippet = f"""
import json, sys
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession({str(exported.dir / FILES[fmt])!r}, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
for n in (1, 7, 64):
    x = np.load({str(tmp_path)!r} + f"/x{{n}}.npy")
    np.save({str(tmp_path)!r} + f"/onnx{{n}}.npy", sess.run(["logits"], {{"images": x}})[0])
assert "torch" not in sys.modules, "onnxruntime alone must be enough"
print(json.dumps(meta))
"""
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    meta = {k: json.loads(v) for k, v in json.loads(proc.stdout).items() if k in (*METADATA_KEYS, *OPTIONAL_KEYS)}
    assert meta == {**EXPECTED_METADATA, "toolkit_version": meta["toolkit_version"]} and meta["toolkit_version"]
    eager = load_backend(exported.dir / "model.safetensors")
    for n, x in batches.items():
        assert_like_eager(fmt, np.load(tmp_path / f"onnx{n}.npy"), eager.predict_logits(x))


def test_fp16_and_int8_files(exported: Export) -> None:
    """Same input and output as model.onnx (`images` fp32 N×3×32×32, `logits` fp32, dynamic batch) and the same
    metadata; fp16 weights; int8 weights in QDQ form, per output channel; how each was made in the manifest."""
    reference = onnx.load(str(exported.dir / "model.onnx"))
    manifest = json.loads((exported.dir / "manifest.json").read_text())["files"]

    def signature(model: onnx.ModelProto) -> list:
        return [(v.name, v.type.tensor_type.elem_type, [bool(d.dim_param) or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in (*model.graph.input, *model.graph.output)]

    for file, weight_type in (("model.fp16.onnx", onnx.TensorProto.FLOAT16), ("model.int8.onnx", onnx.TensorProto.INT8)):
        model = onnx.load(str(exported.dir / file), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
        assert signature(model) == signature(reference) == [("images", onnx.TensorProto.FLOAT, [True, 3, 32, 32]),
                                                              ("logits", onnx.TensorProto.FLOAT, [True, 10])], file
        assert {p.key: p.value for p in model.metadata_props} == {p.key: p.value for p in reference.metadata_props}
        weights = {t.name: t for t in model.graph.initializer}
        assert any(t.data_type == weight_type and len(t.dims) == 4 for t in weights.values()), file  # conv weights
        assert manifest[file]["derived_from"] == "model.onnx" and manifest[file]["opset"] == 18
    int8 = onnx.load(str(exported.dir / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    conv_scale = next(t for t in int8.graph.initializer if t.name.startswith("conv1.weight") and "scale" in t.name)
    assert list(conv_scale.dims) == [6]  # one scale per output channel
    # 450 training images drawn, 448 used: 7 batches of 64, every batch the same size.
    assert manifest["model.int8.onnx"]["calibration"] == {"split": "train", "images": 448, "batch": 64, "seed": 0,
                                                          "data": "synthetic", "method": "MinMax"}


def test_int8_calibration_images_are_fixed_training_images(exported: Export) -> None:
    from toolkit.artifacts import export as export_module
    from toolkit.training.data import load_splits

    source = export_module.load_source(exported.run)
    metadata = ArtifactMetadata(source.classes, list(MEAN), list(STD))
    job = export_module.ExportJob(source, metadata, exported.dir)
    first, info = job.calibration()
    again, _ = job.calibration()
    np.testing.assert_array_equal(first, again)  # seeded: the same images every time
    splits = load_splits(source.record.config.data)
    assert info["images"] == len(first) == min(export_module.CALIBRATION_IMAGES, len(splits.train)) == 450
    train = metadata.normalize(splits.train.images.numpy())
    held_out = metadata.normalize(splits.held_out("test")[0].images.numpy())
    as_rows = {row.tobytes() for row in train}
    assert all(image.tobytes() in as_rows for image in first)  # training images only...
    assert not {image.tobytes() for image in first} & {row.tobytes() for row in held_out}  # ...never held-out ones


def test_derived_formats_alone_and_a_missing_calibration_set(exported: Export, tmp_path: Path, capsys) -> None:
    """--formats onnx-int8 without onnx: model.onnx is made on the side and not kept. Without the run's training
    data, int8 calibration is one line that says how to export without it."""
    out = tmp_path / "int8-only"
    assert_ok(cli(capsys, "export", "--run", exported.run, "--out", out, "--formats", "onnx-int8,onnx-fp16"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.fp16.onnx", "model.int8.onnx",
                                                     "model.safetensors"]
    run = Path(shutil.copytree(exported.run, tmp_path / "moved-run"))
    config = json.loads((run / "config.json").read_text())
    config["data"].update(data="imagefolder", data_dir=str(tmp_path / "gone"))
    (run / "config.json").write_text(json.dumps(config))
    proc = cli(capsys, "export", "--run", run, "--out", tmp_path / "x")
    assert_clean_error(proc, "onnx-int8 calibration needs the run's training images", str(tmp_path / "gone"),
                       "--formats torchscript,pt2,onnx,onnx-fp16")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    assert_ok(cli(capsys, "export", "--run", run, "--out", tmp_path / "x", "--formats", "torchscript,pt2,onnx,onnx-fp16"))


def test_torchscript_and_pt2_load_with_only_torch(exported: Export, tmp_path: Path) -> None:
    """A client with torch alone (no toolkit, no onnxruntime) loads model.ts and model.pt2 with metadata."""
    batches = _batches()
    for n, x in batches.items():
        np.save(tmp_path / f"x{n}.npy", x)
    snippet = f"""
import json, sys, warnings
import numpy as np, torch
warnings.simplefilter("ignore", FutureWarning)
out = {{}}
extra = {{"metadata.json": ""}}
ts = torch.jit.load({str(exported.dir / 'model.ts')!r}, _extra_files=extra)
out["ts"] = json.loads(extra["metadata.json"])
extra = {{"metadata.json": ""}}
pt2 = torch.export.load({str(exported.dir / 'model.pt2')!r}, extra_files=extra).module()
out["pt2"] = json.loads(extra["metadata.json"])
with torch.inference_mode():
    for n in (1, 7, 64):
        x = torch.from_numpy(np.load({str(tmp_path)!r} + f"/x{{n}}.npy"))
        np.save({str(tmp_path)!r} + f"/ts{{n}}.npy", ts(x).numpy())
        np.save({str(tmp_path)!r} + f"/pt2{{n}}.npy", pt2(x).numpy())
assert not {{"toolkit", "onnxruntime", "onnx"}} & set(sys.modules), "torch alone must be enough"
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    for fmt, props in json.loads(proc.stdout).items():
        meta = {k: json.loads(v) for k, v in props.items()}
        assert meta == {**EXPECTED_METADATA, "toolkit_version": meta["toolkit_version"]}, fmt
    eager = load_backend(exported.dir / "model.safetensors")
    for n, x in batches.items():
        for fmt in ("ts", "pt2"):
            np.testing.assert_allclose(np.load(tmp_path / f"{fmt}{n}.npy"), eager.predict_logits(x), atol=1e-5)


def test_metadata_round_trips_through_every_format(exported: Export) -> None:
    manifest = json.loads((exported.dir / "manifest.json").read_text())
    for name in FILES.values():
        meta = load_backend(exported.dir / name).metadata
        assert (meta.class_names, meta.mean, meta.std, meta.input_layout) == \
               (manifest["class_names"], manifest["mean"], manifest["std"], "NCHW"), name
    meta = ArtifactMetadata(["a", "b"], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert ArtifactMetadata.from_strings(meta.to_strings(), Path("x")) == meta


def test_export_refuses_an_existing_folder_unless_overwrite(exported: Export, tmp_path: Path, capsys) -> None:
    out = tmp_path / "again"
    assert_ok(cli(capsys, "export", "--run", exported.run, "--out", out, "--formats", "torchscript"))
    before = sha256_file(out / "manifest.json")
    assert_clean_error(cli(capsys, "export", "--run", exported.run, "--out", out, "--formats", "torchscript"),
                       str(out), "already exists", "--overwrite")
    assert sha256_file(out / "manifest.json") == before
    assert_ok(cli(capsys, "export", "--run", exported.run, "--out", out, "--formats", "pt2", "--overwrite"))
    assert {p.name for p in out.iterdir()} == {"model.pt2", "model.safetensors", "manifest.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary or moved-aside folder left
    # --overwrite never replaces a folder that is not an export.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert_clean_error(cli(capsys, "export", "--run", exported.run, "--out", tmp_path / "precious",
                           "--formats", "torchscript", "--overwrite"), "not an export folder")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_export_from_a_checkpoint_and_of_a_mixed_precision_run_is_fp32(exported: Export, tmp_path: Path,
                                                                       capsys) -> None:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "bf16-run"
    shutil.copytree(exported.run, run)
    config = json.loads((run / "config.json").read_text())
    config["mixed_precision"] = config["runtime"]["mixed_precision"] = "bf16"
    (run / "config.json").write_text(json.dumps(config))
    # A checkpoint whose weights are bf16, as a half-precision state dict would be.
    step = sorted((run / "checkpoints").iterdir())[-1]
    weights = step / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
    state = json.loads((step / "state.json").read_text())
    state["files"]["model.safetensors"] = sha256_file(weights)
    (step / "state.json").write_text(json.dumps(state))

    out = tmp_path / "exp"
    assert_ok(cli(capsys, "export", "--run", run, "--out", out, "--formats", "torchscript", "--checkpoint", step.name))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == step.name
    assert manifest["source"]["sha256"] == sha256_file(weights)
    assert manifest["source"]["trained_mixed_precision"] == "bf16" and manifest["precision"] == "fp32"
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.float32}
    x = _batches()[7]
    np.testing.assert_allclose(load_backend(out / "model.ts").predict_logits(x),
                               load_backend(out / "model.safetensors").predict_logits(x), atol=1e-5)


def test_onnx_falls_back_to_the_torchscript_exporter_and_records_it(tmp_path: Path, monkeypatch) -> None:
    from toolkit.artifacts.export import write_onnx
    from toolkit.training.models import TutorialNet

    real_export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = write_onnx(TutorialNet().eval(), tmp_path / "model.onnx", ArtifactMetadata(CLASSES, list(MEAN), list(STD)))
    assert any("legacy TorchScript-based ONNX export" in str(w.message) for w in caught)
    assert info["exporter"] == "torchscript" and "simulated dynamo failure" in info["note"] and info["opset"] >= 18
    backend = load_backend(tmp_path / "model.onnx")
    assert backend.batch_size is None and backend.predict_logits(_batches()[7]).shape == (7, 10)


@pytest.mark.parametrize("args, fragments", [
    (["--formats", "onnx,tflite"], ["--formats", "tflite"]),
    (["--checkpoint", "step_999999"], ["step_999999", "no such folder"]),
])
def test_export_bad_flags(exported: Export, tmp_path: Path, capsys, args: list[str], fragments: list[str]) -> None:
    assert_clean_error(cli(capsys, "export", "--run", exported.run, "--out", tmp_path / "x", *args), *fragments)
    assert not (tmp_path / "x").exists()


def test_export_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert_clean_error(cli(capsys, "export", "--run", tmp_path, "--out", tmp_path / "x"), str(tmp_path), "not a run folder")


def test_torchscript_falls_back_to_tracing_and_says_so(tmp_path: Path, monkeypatch) -> None:
    from toolkit.artifacts.export import write_torchscript
    from toolkit.training.models import TutorialNet

    def script_fails(module):
        raise RuntimeError("simulated scripting failure")

    monkeypatch.setattr(torch.jit, "script", script_fails)
    # torch 2.14 warns with FutureWarning, 2.11 with DeprecationWarning; export_run turns them into one line
    with pytest.warns((FutureWarning, DeprecationWarning), match=r"torch\.jit\.trace"):
        info = write_torchscript(TutorialNet().eval(), tmp_path / "model.ts",
                                 ArtifactMetadata(CLASSES, list(MEAN), list(STD)))
    assert info["method"] == "trace" and "simulated scripting failure" in info["note"]
    backend = load_backend(tmp_path / "model.ts", check_hash=False)  # a file just written here, no manifest
    assert backend.classes == CLASSES and backend.predict_logits(_batches()[7]).shape == (7, 10)


@pytest.mark.parametrize("name, fragment", [
    ("../model.ts", "not a plain file name"),
    ("/etc/model.ts", "not a plain file name"),
    ("sub/model.ts", "not a plain file name"),
    ("..\\model.ts", "not a plain file name"),
    ("..", "not a plain file name"),
    ("", "not a plain file name"),
    ("model.onnx", "format 'torchscript' needs a .ts file"),
    ("symlink", "a symbolic link to"),
    ("bad-hash", "is not 64 hex digits"),
], ids=["dotdot", "absolute", "subfolder", "backslash", "parent", "empty", "suffix", "symlink", "hash"])
def test_manifest_entries_must_be_files_in_the_export_folder(exported: Export, tmp_path: Path, capsys,
                                                               name: str, fragment: str) -> None:
    """A manifest names the files verify and predict load: each must be a plain file directly in the folder."""
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["files"].pop("model.ts")
    if name == "symlink":
        shutil.copy(folder / "model.ts", tmp_path / "elsewhere.ts")
        (folder / "model.ts").unlink()
        (folder / "model.ts").symlink_to(tmp_path / "elsewhere.ts")
        name = "model.ts"
    elif name == "bad-hash":
        name, entry = "model.ts", {**entry, "sha256": "../../etc/passwd"}
    manifest["files"][name] = entry
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for args in (["verify", folder], ["predict", folder / "model.onnx", folder / "x.png"]):
        assert_clean_error(cli(capsys, *args), str(folder / "manifest.json"), f"files entry {name!r}", fragment)
    # The same folder with the entry put right is accepted again.
    manifest["files"].pop(name)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "model.ts" not in Manifest.read(folder).files


def test_overwrite_never_replaces_a_file_or_a_non_export_folder(exported: Export, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    for args in ([], ["--overwrite"]):
        proc = cli(capsys, "export", "--run", exported.run, "--out", tmp_path / "notes.txt", "--formats", "pt2", *args)
        assert_clean_error(proc, str(tmp_path / "notes.txt"), "already exists" if not args else "not an export folder")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _randomize_batch_norms(model: torch.nn.Module) -> None:
    """Running statistics and shifts as training leaves them (a fresh BatchNorm is the identity), seeded."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "speednet"])
def test_batch_norms_are_folded_into_the_onnx_convolutions(tmp_path: Path, name: str) -> None:
    """resnet18 (conv -> BN) and speednet (conv -> max-pool -> BN with scale 1/√var > 0): model.onnx has no
    BatchNormalization node and gives the eager model's logits."""
    from toolkit.artifacts.export import write_onnx
    from toolkit.training.models import build_model

    torch.manual_seed(0)
    model = build_model(name).eval()
    _randomize_batch_norms(model)
    info = write_onnx(model, tmp_path / "model.onnx", ArtifactMetadata(CLASSES, list(MEAN), list(STD), model=name))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    if name == "speednet":  # its three BNs after a max-pool are folded by our pass (the exporter folds the others)
        assert info["batch_norms_folded"] == 3
    x = _batches()[7]
    with torch.inference_mode():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_backend(tmp_path / "model.onnx").predict_logits(x), eager, atol=1e-4, rtol=1e-4)


def _one_tap_filters(out_channels: int, in_channels: int, g: np.random.Generator) -> np.ndarray:
    """Filters that are the identity (one centre tap of 1 per channel) plus small learned weights, as speednet's
    identity-initialized convolutions are after training."""
    w = 0.01 * g.standard_normal((out_channels, in_channels, 3, 3))
    w[np.arange(out_channels), np.arange(out_channels) % in_channels, 1, 1] += 1.0
    return w.astype(np.float32)


def test_int8_weight_error_tells_one_tap_filters_from_ordinary_ones() -> None:
    from toolkit.artifacts.export import INT8_MAX_WEIGHT_ERROR, int8_weight_error

    g = np.random.default_rng(0)
    assert int8_weight_error(g.standard_normal((64, 64, 3, 3))) < INT8_MAX_WEIGHT_ERROR
    assert int8_weight_error(_one_tap_filters(64, 64, g)) > 2 * INT8_MAX_WEIGHT_ERROR
    assert int8_weight_error(np.zeros((4, 3, 3, 3))) == 0.0


def test_int8_keeps_products_and_one_tap_convolutions_fp32_and_calibrates_in_equal_batches(tmp_path: Path) -> None:
    """images -> Conv (ordinary filters) -> y; y·y -> Conv (one-tap filters) -> logits: the first Conv is int8; the
    Mul's output is not quantized and the second Conv stays fp32 (named in the details); 150 images calibrate as
    two batches of 64."""
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.artifacts.export import write_onnx_int8

    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.2 * g.standard_normal((8, 3, 3, 3))).astype(np.float32), "w_plain"),
             numpy_helper.from_array(_one_tap_filters(8, 8, g), "w_one_tap")]
    nodes = [helper.make_node("Conv", ["images", "w_plain"], ["y"], name="plain", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["y", "y"], ["z"], name="square"),
             helper.make_node("Conv", ["z", "w_one_tap"], ["logits"], name="one_tap", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8, 32, 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "fp32.onnx"))

    info = write_onnx_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", ArtifactMetadata(CLASSES, list(MEAN), list(STD)),
                           g.standard_normal((150, 3, 32, 32)).astype(np.float32), {"split": "train"})
    assert info["calibration"] == {"split": "train", "images": 128, "batch": 64, "method": "MinMax"}
    assert list(info["kept_fp32_by_weight_error"]) == ["one_tap"]
    model = onnx.load(str(tmp_path / "int8.onnx"))
    producer = {out: n for n in model.graph.node for out in n.output}
    dtypes = {t.name: t.data_type for t in model.graph.initializer}

    def quantized(node_name: str, index: int) -> bool:  # its input `index` comes out of a DequantizeLinear
        node = next(n for n in model.graph.node if n.name == node_name)
        source = producer.get(node.input[index])
        return source is not None and source.op_type == "DequantizeLinear"

    assert quantized("plain", 0) and quantized("plain", 1)
    assert dtypes[producer[next(n for n in model.graph.node if n.name == "plain").input[1]].input[0]] == TensorProto.INT8
    square = next(n for n in model.graph.node if n.name == "square")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == square.output[0] for n in model.graph.node)
    assert not quantized("one_tap", 1) and dtypes["w_one_tap"] == TensorProto.FLOAT

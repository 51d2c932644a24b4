"""toolkit predict: image files -> class and probability, through any artifact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from tests.helpers import (FILES, ROOT, Export, assert_clean_error, assert_ok, cli, edit_onnx, rehash, rewrite_zip,
                           swap_after_first_hash)
from toolkit.artifacts.backends import load_backend
from toolkit.core.errors import ArtifactError, ConfigError, DataError, InputError
from toolkit.training.data import make_synthetic, write_imagefolder
from toolkit.apps.predict import load, predict_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """30 images of the synthetic test split the fixture's model was evaluated on, as PNG files, with labels."""
    test = make_synthetic(500, 200)[1]
    root = tmp_path_factory.mktemp("images")
    write_imagefolder(test.subset("test", torch.arange(30)), root)
    return [(p, p.parent.name) for p in sorted(root.glob("*/*.png"))]


@pytest.mark.parametrize("artifact", [f for f in FILES.values() if f != "model.safetensors"])
def test_predict_labels_synthetic_images(exported: Export, images, capsys, artifact: str) -> None:
    proc = cli(capsys, "predict", exported.dir / artifact, *[p for p, _ in images], "--json")
    assert_ok(proc)
    predictions = json.loads(proc.stdout)
    assert [p["image"] for p in predictions] == [str(p) for p, _ in images]
    assert [p["class"] for p in predictions] == [label for _, label in images]
    assert all(0.1 < p["probability"] <= 1.0 and p["top_k"][0]["class"] == p["class"] for p in predictions)
    assert {p["provider"] for p in predictions} == {"cpu"}  # where it ran; torch formats always on the CPU


@pytest.mark.parametrize("artifact", ["model.onnx", "model.fp16.onnx", "model.int8.onnx"])
def test_predicting_with_an_onnx_file_never_imports_torch(exported: Export, images, artifact: str) -> None:
    """`toolkit predict` and the Python API serve .onnx files with onnxruntime, numpy and PIL only (not even the
    `onnx` package): torch alone takes longer to import than the whole prediction."""
    code = f"""
import sys
from toolkit.apps.cli import main
assert main(["predict", {str(exported.dir / artifact)!r}, {str(images[0][0])!r}]) == 0
from toolkit.apps.predict import load
load({str(exported.dir / artifact)!r}).predict([{str(images[1][0])!r}])
heavy = sorted(m for m in ("torch", "onnx", "torchvision", "accelerate", "matplotlib") if m in sys.modules)
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert proc.stdout.split()[1] == images[0][1]


def test_the_python_api_takes_files_pil_images_and_arrays(exported: Export, images) -> None:
    """`load(path).predict(...)`: one image or many, as file paths, PIL images, uint8 pixels (3×32×32 or H×W×3 of
    any size) or float32 normalized pixels, mixed freely; the same labels and probabilities as the files give."""
    model = load(exported.dir / "model.onnx")
    assert model.classes == [f"class{i}" for i in range(10)] and model.provider == "cpu"
    paths = [p for p, _ in images[:4]]
    labels = [label for _, label in images[:4]]
    by_file = model.predict(paths, top_k=3)
    assert [p.label for p in by_file] == labels and [p.image for p in by_file] == [str(p) for p in paths]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # N×32×32×3 uint8
    chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    big = Image.fromarray(pixels[2]).resize((64, 64), Image.NEAREST)  # 64×64: resized back like training data
    normalized = model.backend.metadata.normalize(chw)
    for given in (chw, list(chw), [Image.open(p) for p in paths], list(pixels), normalized, list(normalized),
                  [str(paths[0]), Image.open(paths[1]), chw[2], normalized[3]]):
        predictions = model.predict(given, top_k=3)
        assert [p.label for p in predictions] == labels
        for a, b in zip(predictions, by_file):
            assert [c for c, _ in a.top] == [c for c, _ in b.top]
            np.testing.assert_allclose([q for _, q in a.top], [q for _, q in b.top], atol=1e-5)
    assert [p.image for p in model.predict(chw)] == ["[0]", "[1]", "[2]", "[3]"]
    assert model.predict(big)[0].label == labels[2] and model.predict(chw[0])[0].label == labels[0]
    assert model.predict(paths[0])[0].image == str(paths[0])


@pytest.mark.parametrize("given, fragments", [
    (np.zeros((32, 32), np.uint8), ["image [0]", "expected a file path, a PIL image", "got a uint8 array of shape 32×32"]),
    (np.zeros((3, 28, 28), np.float32), ["image [0]", "float32 array of shape 3×28×28"]),
    (np.zeros((3, 32, 32), np.float64), ["float64 array"]),
    ([1.5], ["image [0]", "got float"]),
    ([], ["no images given"]),
    (np.full((1, 3, 32, 32), np.nan, np.float32), ["NaN or inf"]),
    ("missing.png", ["missing.png", "cannot read image (no such file)"]),
], ids=["gray-array", "float-size", "float64", "number", "empty", "nan", "missing"])
def test_the_python_api_refuses_bad_images_in_one_line(exported: Export, given, fragments: list[str]) -> None:
    with pytest.raises((InputError, ConfigError, DataError)) as info:
        load(exported.dir / "model.onnx").predict(given)
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)


def test_the_python_api_checks_the_manifest_and_works_on_every_format(exported: Export, images, tmp_path: Path) -> None:
    for file in FILES.values():
        assert load(exported.dir / file).predict(images[0][0])[0].label == images[0][1], file
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))
    edit_onnx(folder / "model.int8.onnx", lambda m: m.metadata_props.add(key="note", value="changed"))
    with pytest.raises(ArtifactError, match="sha256 .* differs from manifest.json"):
        load(folder / "model.int8.onnx")
    assert load(folder / "model.int8.onnx", check_hash=False).predict(images[0][0])[0].label == images[0][1]


def test_predict_text_output_top_k_and_threads(exported: Export, images, capsys) -> None:
    (first, label), (second, _) = images[0], images[1]
    proc = cli(capsys, "predict", exported.dir / "model.onnx", first, second, "--top-k", "3", "--threads", "1")
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(first)) and lines[0].split()[1] == label
    assert lines[0].count("%") == 3
    top = predict_images(exported.dir / "model.onnx", [first], top_k=10)[0].top
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1.0) < 1e-5


def test_predict_accepts_any_size_and_format(exported: Export, images, tmp_path: Path) -> None:
    """A 64×64 JPEG, an RGBA PNG and a grayscale image are converted to 32×32 RGB like training data."""
    path, label = images[0]
    big = Image.open(path).resize((64, 64), Image.NEAREST)
    big.save(tmp_path / "big.jpg", quality=95)
    Image.open(path).convert("RGBA").save(tmp_path / "rgba.png")
    Image.open(path).convert("L").save(tmp_path / "gray.png")
    files = [tmp_path / "big.jpg", tmp_path / "rgba.png", tmp_path / "gray.png"]
    predictions = predict_images(exported.dir / "model.onnx", files)
    assert [p.label for p in predictions[:2]] == [label, label]  # same picture, other encoding
    assert 0 < predictions[2].probability <= 1


def test_predict_uses_the_normalization_in_the_artifact(exported: Export, images, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))

    def other_mean(model) -> None:
        next(p for p in model.metadata_props if p.key == "mean").value = json.dumps([0.1, 0.1, 0.1])

    edit_onnx(folder / "model.onnx", other_mean)
    rehash(folder, "model.onnx")
    files = [p for p, _ in images[:5]]
    true = [p.probability for p in predict_images(exported.dir / "model.onnx", files)]
    shifted = [p.probability for p in predict_images(folder / "model.onnx", files)]
    assert not np.allclose(true, shifted, atol=1e-3)


def test_predict_refuses_a_file_that_differs_from_its_manifest(exported: Export, images, tmp_path: Path,
                                                                 capsys) -> None:
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))
    edit_onnx(folder / "model.onnx", lambda m: m.metadata_props.add(key="note", value="changed"))
    image = images[0][0]
    assert_clean_error(cli(capsys, "predict", folder / "model.onnx", image), str(folder / "model.onnx"), "sha256",
                       "--no-hash-check")
    assert_ok(cli(capsys, "predict", folder / "model.onnx", image, "--no-hash-check"))


def test_predict_bad_inputs(exported: Export, images, tmp_path: Path, capsys) -> None:
    onnx_file, image = exported.dir / "model.onnx", images[0][0]
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "cut.png").write_bytes(image.read_bytes()[:40])
    cases = [
        ([onnx_file], ["no images given"]),
        ([onnx_file, tmp_path / "missing.png"], [str(tmp_path / "missing.png"), "cannot read"]),
        ([onnx_file, image, tmp_path / "notes.png"], [str(tmp_path / "notes.png"), "not a readable image"]),
        ([onnx_file, tmp_path / "cut.png"], [str(tmp_path / "cut.png"), "not a readable image"]),
        ([tmp_path / "missing.onnx", image], [str(tmp_path / "missing.onnx"), "no such file"]),
        ([tmp_path / "notes.png", image], ["notes.png", "unsupported artifact type"]),
        ([onnx_file, image, "--top-k", "11"], ["--top-k", "between 1 and 10", "11"]),
        ([onnx_file, image, "--threads", "0"], ["--threads", ">= 1"]),
        ([onnx_file, image, "--provider", "cuda"], ["--provider cuda", "has no CUDAExecutionProvider",
                                                    "pip install 'cifar-toolkit[gpu]'"]),
        ([exported.dir / "model.pt2", image, "--provider", "tensorrt"], ["--provider tensorrt", "runs on the CPU"]),
    ]
    for args, fragments in cases:
        assert_clean_error(cli(capsys, "predict", *args), *fragments)


def test_predict_max_batch_and_chunks(exported: Export, images, capsys, monkeypatch) -> None:
    import toolkit.apps.predict

    onnx_file, files = exported.dir / "model.onnx", [p for p, _ in images[:5]]
    assert_clean_error(cli(capsys, "predict", onnx_file, *files[:3], "--max-batch", "2"),
                       "3 images exceed the limit of 2", "--max-batch")
    assert_clean_error(cli(capsys, "predict", onnx_file, files[0], "--max-batch", "0"), "--max-batch", ">= 1")
    whole = predict_images(onnx_file, files, top_k=10, max_batch=5)
    monkeypatch.setattr(toolkit.apps.predict, "CHUNK", 2)  # decoded and run 2, 2 and 1 at a time
    chunked = predict_images(onnx_file, files, top_k=10, max_batch=5)
    assert [p.image for p in chunked] == [str(f) for f in files]
    for a, b in zip(whole, chunked):
        assert a.label == b.label and np.allclose([q for _, q in a.top], [q for _, q in b.top], atol=1e-6)


def test_predict_refuses_folders_and_special_files_as_images(exported: Export, images, tmp_path: Path, capsys) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.png")  # reading it would block forever
    (tmp_path / "folder.png").mkdir()
    for name in ("pipe.png", "folder.png"):
        assert_clean_error(cli(capsys, "predict", exported.dir / "model.onnx", images[0][0], tmp_path / name),
                           str(tmp_path / name), "cannot read image (not a regular file)")


def _torch_loads(monkeypatch) -> list[object]:
    """What torch's program loaders are asked to open from now on (each call fails, so nothing loads)."""
    opened: list[object] = []

    def record(f, *args, **kwargs):
        opened.append(f)
        raise AssertionError("torch was asked to load the program")

    monkeypatch.setattr(torch.jit, "load", record)
    monkeypatch.setattr(torch.export, "load", record)
    return opened


@pytest.mark.parametrize("program", ["model.ts", "model.pt2"])
def test_predict_checks_a_programs_hash_before_loading_it(exported: Export, images, tmp_path: Path, capsys,
                                                          monkeypatch, program: str) -> None:
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))
    with open(folder / program, "ab") as f:
        f.write(b"\0")
    opened = _torch_loads(monkeypatch)
    assert_clean_error(cli(capsys, "predict", folder / program, images[0][0]), str(folder / program), "sha256",
                       "--no-hash-check")
    assert opened == []


@pytest.mark.parametrize("program", ["model.ts", "model.pt2"])
def test_predict_refuses_a_program_that_no_manifest_lists(exported: Export, images, tmp_path: Path, capsys,
                                                           monkeypatch, program: str) -> None:
    """A .ts or .pt2 file runs code while loading: with no manifest.json entry to check its sha256 against (no
    manifest beside it, or one that does not list it) it is refused before torch sees it; --no-hash-check accepts
    it. A data file needs no entry."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in (program, "model.onnx"):
        shutil.copy(exported.dir / name, alone / name)
    unlisted = Path(shutil.copytree(exported.dir, tmp_path / "export")) / f"copy{Path(program).suffix}"
    shutil.copy(exported.dir / program, unlisted)
    image, label = images[0]
    assert_ok(cli(capsys, "predict", alone / "model.onnx", image))
    for path in (alone / program, unlisted):
        with monkeypatch.context() as patch:
            opened = _torch_loads(patch)
            assert_clean_error(cli(capsys, "predict", path, image), str(path), "no manifest.json entry to check it "
                               "against", "a program that runs code while loading", "--no-hash-check")
            assert opened == []
        proc = cli(capsys, "predict", path, image, "--no-hash-check")
        assert_ok(proc)
        assert proc.stdout.split()[1] == label


def _zeroed_weights(src: Path, dst: Path) -> bytes:
    """A loadable file of `src`'s format whose float weights are all zero: it gives other logits than `src`."""
    if src.suffix == ".onnx":
        shutil.copy(src, dst)

        def zero(model) -> None:
            for tensor in model.graph.initializer:
                values = numpy_helper.to_array(tensor)
                if values.dtype == np.float32:
                    tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(values), tensor.name))

        edit_onnx(dst, zero)
    else:  # TorchScript keeps tensors in data/<n>, torch.export in data/weights/weight_<n>, as raw bytes
        with zipfile.ZipFile(src) as archive:
            tensors = {i.filename: bytes(i.file_size) for i in archive.infolist()
                       if re.search(r"/data/(\d+|weights/weight_\d+)$", i.filename)}
        assert tensors
        rewrite_zip(src, dst, replace=tensors)
    return dst.read_bytes()


@pytest.mark.parametrize("artifact", ["model.ts", "model.pt2", "model.onnx"])
def test_the_bytes_whose_hash_is_checked_are_the_bytes_loaded(exported: Export, tmp_path: Path, monkeypatch,
                                                              artifact: str) -> None:
    """The file is swapped for another loadable model right after its sha256 was computed: what runs is still the
    file whose hash matched the manifest (read once), never the swapped one."""
    folder = Path(shutil.copytree(exported.dir, tmp_path / "export"))
    path = folder / artifact
    other = _zeroed_weights(path, tmp_path / f"other{path.suffix}")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with monkeypatch.context() as patch:
        swaps = swap_after_first_hash(patch, path, other)  # the first hash computed is the artifact's
        logits = load(path).backend.predict_logits(x)
    assert swaps == [path] and path.read_bytes() == other
    np.testing.assert_array_equal(logits, load_backend(exported.dir / artifact).predict_logits(x))
    assert not np.allclose(load(path, check_hash=False).backend.predict_logits(x), logits, atol=1e-3)

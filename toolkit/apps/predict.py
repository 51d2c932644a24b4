"""Label images with an exported model (or the eager weights): `toolkit predict`, and `load` for Python.

    from toolkit.apps.predict import load
    model = load("exports/main/model.onnx")         # any format; .onnx files import no torch
    model.predict(["cat.jpg", "dog.png"], top_k=3)  # files, PIL images, uint8 or float32 arrays
    # -> [Prediction(image='cat.jpg', label='cat', probability=0.81, top=[('cat', 0.81), ...]), ...]

Images are decoded exactly as training decoded image folders (`toolkit.core.images.decode_image`: RGB,
bilinear resize to 32×32) and normalized with the mean/std embedded in the artifact itself, so the
artifact is the single source of truth for its own preprocessing and labels. With an .onnx model only
onnxruntime, numpy and PIL are imported; torch only for torch formats (.ts, .pt2, .safetensors).

The artifact's sha256 is checked against the manifest.json beside it before it is loaded, and a .ts or
.pt2 file (a program: see `toolkit.artifacts.backends`) that no manifest lists is refused, unless
`--no-hash-check` is given. Image files are untrusted input: any file that does not decode is a
`DataError` naming it. At most `max_batch` images per call (`--max-batch`), decoded and run `CHUNK` at
a time, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.artifacts.backends import CHUNK, DEFAULT_MAX_BATCH, DEFAULT_PROVIDER, Backend, load_backend
from toolkit.core.errors import ConfigError, DataError, InputError, first_line
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH, decode_image, image_pixels

# What `Classifier.predict` labels: one image or a sequence of them. An image is a file path, a PIL image,
# uint8 pixels (3×32×32, or H×W×3 of any size), or float32 normalized pixels (3×32×32); a 4-d array
# is a batch of the same.
ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Prediction:
    image: str  # the file, or `[i]` for the i-th image given as an array or PIL image
    label: str
    probability: float
    top: list[tuple[str, float]]  # the top-k (class, probability), most likely first
    provider: str | None = None  # where the model ran (`--provider`)

    def to_json(self) -> dict[str, Any]:
        out = {"image": self.image, "class": self.label, "probability": self.probability,
               "top_k": [{"class": c, "probability": p} for c, p in self.top]}
        return out if self.provider is None else {**out, "provider": self.provider}


def read_image(path: Path) -> np.ndarray:
    """An image file -> 3×32×32 uint8; a missing or unreadable file is a `DataError` naming it."""
    if not path.is_file():  # also keeps a FIFO or device from blocking the read
        raise DataError(f"{path}: cannot read image ({'not a regular file' if path.exists() else 'no such file'})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode_image(data, source=str(path))  # any decoder failure is a DataError naming the file


def _pil_pixels(image: Image.Image, name: str) -> np.ndarray:
    """A PIL image -> 3×32×32 uint8, converted and resized as files are."""
    try:
        return image_pixels(image)
    except Exception as exc:  # noqa: BLE001 - PIL's conversions fail in many ways for odd modes
        raise InputError(f"image {name}: cannot convert this PIL image to RGB ({first_line(exc)})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow for large logits
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """A loaded model that labels images: `predict` for labels and probabilities, `backend` for logits."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def classes(self) -> list[str]:
        return self.backend.classes

    @property
    def provider(self) -> str:
        """Where the model runs: cpu, cuda or tensorrt."""
        return self.backend.provider

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[Prediction]:
        """Class, probability and top-k (class, probability) for each image, in order.

        `images`: one image or a sequence or 4-d array of them (see `ImageLike`). Bad input is a one-line
        `ToolkitError`: a file that does not decode names the file, an array names its shape and dtype.
        """
        if not 1 <= top_k <= len(self.classes):
            raise ConfigError(f"--top-k: must be between 1 and {len(self.classes)}, got {top_k}")
        items = list(images) if isinstance(images, (list, tuple)) or _is_batch(images) else [images]
        if not items:
            raise ConfigError("no images given: pass one or more image files (PNG, JPEG, ...)")
        limit = self.backend.max_batch
        if limit is not None and len(items) > limit:
            raise InputError(f"{len(items)} images exceed the limit of {limit} per call (--max-batch)")
        out = []
        for start in range(0, len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            names = [str(item) if isinstance(item, (str, os.PathLike)) else f"[{start + i}]"
                     for i, item in enumerate(chunk)]
            batch = np.stack([self._normalized(item, name) for item, name in zip(chunk, names)])
            probabilities = softmax(self.backend.predict_logits(batch).astype(np.float64))
            for name, p in zip(names, probabilities):
                top = top_classes(p, self.classes, top_k)
                out.append(Prediction(name, top[0][0], top[0][1], top, self.provider))
        return out

    def _normalized(self, item: ImageLike, name: str) -> np.ndarray:
        """One image -> 3×32×32 float32 normalized with the artifact's mean/std (float32 input: as it is)."""
        if isinstance(item, (str, os.PathLike)):
            pixels = read_image(Path(item))
        elif isinstance(item, Image.Image):
            pixels = _pil_pixels(item, name)
        elif isinstance(item, np.ndarray) and item.dtype == np.float32 and item.shape == (CHANNELS, HEIGHT, WIDTH):
            return item  # already normalized; predict_logits checks the values
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == (CHANNELS, HEIGHT, WIDTH):
            pixels = item
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3 and item.shape[2] == 3:
            pixels = _pil_pixels(Image.fromarray(item, "RGB"), name)  # H×W×3, any size
        else:
            what = (f"a {item.dtype} array of shape {'×'.join(map(str, item.shape)) or 'scalar'}"
                    if isinstance(item, np.ndarray) else type(item).__name__)
            raise InputError(f"image {name}: expected a file path, a PIL image, uint8 pixels {CHANNELS}×{HEIGHT}×{WIDTH} "
                             f"or H×W×3, or float32 normalized pixels {CHANNELS}×{HEIGHT}×{WIDTH}; got {what}")
        return self.backend.metadata.normalize(pixels[None])[0]


def top_classes(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The `k` most likely (class, probability) of one image's probabilities, most likely first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def _is_batch(images: object) -> bool:
    return isinstance(images, np.ndarray) and images.ndim == 4


def load(artifact: str | Path, threads: int | None = None, provider: str = DEFAULT_PROVIDER,
         check_hash: bool = True, max_batch: int | None = DEFAULT_MAX_BATCH, model: str | None = None) -> Classifier:
    """A model file (any registered format) or a run/export folder (its eager weights), ready to `predict`.

    With `check_hash` (`--no-hash-check` turns it off), an artifact listed in a manifest.json beside it must
    still have its recorded sha256, and a .ts or .pt2 file (a program) must be listed there; the bytes checked
    are the bytes loaded (`load_backend`). `provider`: where ONNX Runtime runs (auto, cpu, cuda, tensorrt).
    `model`: for eager weights of a user's model, its `package.module:factory`, which only naming it imports.
    """
    return Classifier(load_backend(artifact, threads=threads, provider=provider, max_batch=max_batch,
                                   check_hash=check_hash, model=model))


def predict_images(artifact: Path, images: Sequence[Path], top_k: int = 1, threads: int | None = None,
                   check_hash: bool = True, max_batch: int | None = DEFAULT_MAX_BATCH,
                   provider: str = DEFAULT_PROVIDER, model: str | None = None) -> list[Prediction]:
    """Class and probability for each image file, from any artifact `load_backend` accepts.

    Arguments are checked before the model is loaded; more than `max_batch` images is an `InputError`.
    """
    if not images:
        raise ConfigError("no images given: pass one or more image files (PNG, JPEG, ...)")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ConfigError(f"--max-batch: must be an integer >= 1, got {max_batch!r}")
    if max_batch is not None and len(images) > max_batch:
        raise InputError(f"{len(images)} images exceed the limit of {max_batch} per call (--max-batch)")
    classifier = load(artifact, threads, provider, check_hash, max_batch, model)
    return classifier.predict([Path(p) for p in images], top_k)


def format_predictions(predictions: Sequence[Prediction]) -> str:
    width = max(len(p.image) for p in predictions)
    return "\n".join(f"{p.image:<{width}s}  " + ", ".join(f"{c} {100 * q:.1f} %" for c, q in p.top)
                     for p in predictions)


def predict_and_report(artifact: Path, images: Sequence[Path], top_k: int = 1, threads: int | None = None,
                       check_hash: bool = True, as_json: bool = False,
                       log: Callable[[str], None] = print,
                       max_batch: int | None = DEFAULT_MAX_BATCH,
                       provider: str = DEFAULT_PROVIDER, model: str | None = None) -> list[Prediction]:
    """`toolkit predict`: print one line per image, or a JSON list with `as_json` (each entry names the
    provider the model ran on)."""
    predictions = predict_images(artifact, images, top_k, threads, check_hash, max_batch, provider, model)
    log(json.dumps([p.to_json() for p in predictions], indent=2) if as_json else format_predictions(predictions))
    return predictions

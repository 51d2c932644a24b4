"""Label image files with an exported model (or the eager weights), through `toolkit.artifacts.backends`.

Images are decoded exactly as training decoded image folders (`toolkit.core.images.decode_image`: RGB,
bilinear resize to 32×32) and normalized with the mean/std embedded in the artifact itself, so the
artifact is the single source of truth for its own preprocessing and labels.

The artifact's sha256 is checked against the manifest.json beside it before it is loaded (.ts and
.pt2 files are programs: see `toolkit.artifacts.backends`). Image files are untrusted input: any file that
does not decode is a `DataError` naming it. At most `max_batch` images per call (`--max-batch`),
decoded and run `CHUNK` at a time, so memory stays bounded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts.backends import CHUNK, DEFAULT_MAX_BATCH, load_backend
from toolkit.artifacts.manifest import hash_mismatch
from toolkit.core.errors import ArtifactError, ConfigError, DataError, InputError, first_line
from toolkit.core.images import decode_image


@dataclass
class Prediction:
    image: str
    label: str
    probability: float
    top: list[tuple[str, float]]  # the top-k (class, probability), most likely first

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "class": self.label, "probability": self.probability,
                "top_k": [{"class": c, "probability": p} for c, p in self.top]}


def load_images(paths: Sequence[Path]) -> np.ndarray:
    """Image files -> N×3×32×32 uint8; a missing or unreadable file is a `DataError` naming it."""
    if not paths:
        raise ConfigError("no images given: pass one or more image files (PNG, JPEG, ...)")
    images = []
    for path in paths:
        path = Path(path)
        if not path.is_file():  # also keeps a FIFO or device from blocking the read
            raise DataError(f"{path}: cannot read image ({'not a regular file' if path.exists() else 'no such file'})")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
        try:
            images.append(decode_image(data, source=str(path)))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes fail in many ways (struct.error, ...)
            raise DataError(f"{path}: not a readable image ({first_line(exc)})") from None
    return np.stack(images)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow for large logits
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def predict_images(artifact: Path, images: Sequence[Path], top_k: int = 1, threads: int | None = None,
                   check_hash: bool = True, max_batch: int | None = DEFAULT_MAX_BATCH) -> list[Prediction]:
    """Class and probability for each image file, from any artifact `load_backend` accepts.

    With `check_hash`, an artifact listed in a manifest.json beside it must still have its recorded sha256
    (checked before the file is loaded). More than `max_batch` images is an `InputError`.
    """
    if not images:
        raise ConfigError("no images given: pass one or more image files (PNG, JPEG, ...)")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ConfigError(f"--max-batch: must be an integer >= 1, got {max_batch!r}")
    if max_batch is not None and len(images) > max_batch:
        raise InputError(f"{len(images)} images exceed the limit of {max_batch} per call (--max-batch)")
    if check_hash and (problem := hash_mismatch(Path(artifact))):
        raise ArtifactError(f"{problem} (pass --no-hash-check to use it anyway)")
    backend = load_backend(artifact, threads=threads, max_batch=max_batch)
    if not 1 <= top_k <= len(backend.classes):
        raise ConfigError(f"--top-k: must be between 1 and {len(backend.classes)}, got {top_k}")
    out = []
    for start in range(0, len(images), CHUNK):
        chunk = list(images[start:start + CHUNK])
        logits = backend.predict_logits(backend.metadata.normalize(load_images(chunk)))
        for path, p in zip(chunk, softmax(logits.astype(np.float64))):
            order = np.argsort(-p, kind="stable")[:top_k]
            top = [(backend.classes[i], float(p[i])) for i in order]
            out.append(Prediction(str(path), top[0][0], top[0][1], top))
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    width = max(len(p.image) for p in predictions)
    return "\n".join(f"{p.image:<{width}s}  " + ", ".join(f"{c} {100 * q:.1f} %" for c, q in p.top)
                     for p in predictions)


def predict_and_report(artifact: Path, images: Sequence[Path], top_k: int = 1, threads: int | None = None,
                       check_hash: bool = True, as_json: bool = False,
                       log: Callable[[str], None] = print,
                       max_batch: int | None = DEFAULT_MAX_BATCH) -> list[Prediction]:
    """`toolkit predict`: print one line per image, or a JSON list with `as_json`."""
    predictions = predict_images(artifact, images, top_k, threads, check_hash, max_batch)
    log(json.dumps([p.to_json() for p in predictions], indent=2) if as_json else format_predictions(predictions))
    return predictions

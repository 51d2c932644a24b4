"""What every model file says about itself: its input and output, class names and preprocessing.

ONNX keeps `ArtifactMetadata` in `metadata_props`, TorchScript and torch.export in an extra file
`metadata.json` inside the archive, eager weights in the safetensors header. So a client holding
one file and its runtime can preprocess and label correctly. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit import __version__
from toolkit.core.errors import ArtifactError
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH, normalize

INPUT_NAME = "images"  # N×3×32×32 float32, normalized
OUTPUT_NAME = "logits"  # N×classes float32
INPUT_LAYOUT = "NCHW"
INPUT_SPEC = f"N×{CHANNELS}×{HEIGHT}×{WIDTH} float32"  # as error messages state it
METADATA_FILE = "metadata.json"  # extra file inside .ts / .pt2 archives
METADATA_KEYS = ("class_names", "mean", "std", "input_layout", "toolkit_version")
OPTIONAL_KEYS = ("model",)  # absent from files exported before it was recorded


@dataclass(frozen=True)
class ArtifactMetadata:
    """What a client needs besides the model: labels and the preprocessing that training used."""

    class_names: list[str]
    mean: list[float]
    std: list[float]
    input_layout: str = INPUT_LAYOUT
    toolkit_version: str = __version__
    model: str | None = None  # the model it was exported from: a built-in name or a user's package.module:factory

    def to_strings(self) -> dict[str, str]:
        """The same key -> JSON-string mapping for ONNX `metadata_props` and `metadata.json`."""
        return {k: json.dumps(getattr(self, k)) for k in (*METADATA_KEYS, *OPTIONAL_KEYS)
                if getattr(self, k) is not None}

    @classmethod
    def from_strings(cls, props: dict[str, str], source: Path) -> ArtifactMetadata:
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ArtifactError(f"{source}: no toolkit metadata {missing} (was it written by `toolkit export`?)")
        try:
            values = {k: json.loads(props[k]) for k in (*METADATA_KEYS, *OPTIONAL_KEYS) if k in props}
            meta = cls(**values)
            ok = (isinstance(meta.class_names, list) and all(isinstance(c, str) for c in meta.class_names)
                  and (meta.model is None or isinstance(meta.model, str))
                  and len(meta.mean) == CHANNELS and len(meta.std) == CHANNELS
                  and all(float(s) > 0 for s in meta.std))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{source}: unreadable toolkit metadata ({exc})") from None
        if not ok:
            raise ArtifactError(f"{source}: invalid toolkit metadata: class_names must be a list of names, "
                                f"mean and std {CHANNELS} numbers each (std > 0); got {values}")
        if meta.input_layout != INPUT_LAYOUT:
            raise ArtifactError(f"{source}: input_layout {meta.input_layout!r}, expected {INPUT_LAYOUT!r}")
        return meta

    @classmethod
    def from_json(cls, raw: bytes | str, source: Path) -> ArtifactMetadata:
        """From the `metadata.json` inside a .ts or .pt2 archive."""
        if not raw:
            raise ArtifactError(f"{source}: no {METADATA_FILE} inside (was it written by `toolkit export`?)")
        try:
            props = json.loads(raw)
        except ValueError as exc:
            raise ArtifactError(f"{source}: unreadable {METADATA_FILE} ({exc})") from None
        if not isinstance(props, dict):
            raise ArtifactError(f"{source}: {METADATA_FILE} is not a JSON object")
        return cls.from_strings(props, source)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×3×H×W pixels (numpy, or a CPU torch tensor) -> float32 (x/255 - mean) / std."""
        return normalize(np.asarray(images), self.mean, self.std)


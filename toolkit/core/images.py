"""The image format every layer agrees on: 3×32×32 RGB uint8 pixels, normalized as the tutorial does.

Training decodes image folders with `decode_image`; `toolkit predict` decodes the user's files with
the same function, so a served image is preprocessed exactly as a training image was. numpy and
PIL only: serving an ONNX model never imports torch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from toolkit.core.errors import DataError

CHANNELS, HEIGHT, WIDTH = 3, 32, 32
IMAGE_SIZE = HEIGHT  # square images
# The tutorial's normalization: per-channel (x - 0.5) / 0.5 after scaling pixels to [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def image_pixels(image: Image.Image) -> np.ndarray:
    """A PIL image -> 3×32×32 uint8 RGB (resized bilinearly when not 32×32), as training decodes files."""
    image = image.convert("RGB")
    if image.size != (WIDTH, HEIGHT):
        image = image.resize((WIDTH, HEIGHT), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Bytes of any PIL-readable image -> 3×32×32 uint8 RGB (`image_pixels`).

    Image files are untrusted input: whatever PIL's decoders raise becomes a `DataError` naming `source`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return image_pixels(im)
    except Exception as exc:  # PIL's decoders raise many types (OSError, ValueError, SyntaxError, struct.error, ...)
        # PIL reports bytes it cannot identify or decode as OSError (UnidentifiedImageError is one); which of
        # the two a given garbage file gets differs between PIL releases.
        reason = "unknown or truncated image format" if isinstance(exc, OSError) else exc
        raise DataError(f"{source}: not a readable image ({reason})") from None


def normalize(images: np.ndarray, mean: tuple[float, ...] | list[float] = MEAN,
              std: tuple[float, ...] | list[float] = STD) -> np.ndarray:
    """uint8 N×3×H×W pixels -> float32 (x/255 - mean) / std, exactly as training preprocesses."""
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, CHANNELS, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, CHANNELS, 1, 1)
    return (x - m) / s

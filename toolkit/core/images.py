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


def _view_index(shift: int, flip: bool, size: int = IMAGE_SIZE) -> np.ndarray:
    """Source pixel of each output pixel along one axis: shifted by `shift` px with reflection at the border
    (as padding in "reflect" mode and cropping does), then mirrored when `flip`."""
    index = np.arange(size) + shift
    index = np.abs(index)  # -1 -> 1: reflect at the first pixel
    index = np.where(index > size - 1, 2 * (size - 1) - index, index)  # size -> size - 2: at the last
    return index[::-1].copy() if flip else index


# Test-time augmentation levels (`--tta`): (row shift, column shift, mirrored, weight) per view. flip-translate
# is airbench's: half the weight on the image and its mirror, half on both shifted 1 px up-left and down-right.
TTA_VIEWS: dict[str, tuple[tuple[int, int, bool, float], ...]] = {
    "none": ((0, 0, False, 1.0),),
    "flip": ((0, 0, False, 0.5), (0, 0, True, 0.5)),
    "flip-translate": ((0, 0, False, 0.25), (0, 0, True, 0.25),
                       (-1, -1, False, 0.125), (-1, -1, True, 0.125), (1, 1, False, 0.125), (1, 1, True, 0.125)),
}


def tta_logits(predict, images, level: str):
    """The weighted mean of `predict` over the views of `level` (`TTA_VIEWS`) of a normalized N×3×H×W batch.

    Views are index gathers that numpy arrays and torch tensors take alike, so evaluation (torch, on the
    device) and verification of exported files (numpy) classify the very same views."""
    if level not in TTA_VIEWS:
        raise DataError(f"--tta: unknown level {level!r}; choose from {', '.join(TTA_VIEWS)}")
    total = None
    for row_shift, col_shift, flip, weight in TTA_VIEWS[level]:
        view = images
        if row_shift or col_shift or flip:
            rows, cols = _view_index(row_shift, False, images.shape[2]), _view_index(col_shift, flip, images.shape[3])
            view = images[:, :, rows][:, :, :, cols]
        logits = predict(view) * weight
        total = logits if total is None else total + logits
    return total

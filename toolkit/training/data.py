"""Data: every source becomes one in-memory `Split` of uint8 images, served in whole batches.

Sources (`DataConfig.data`):
- `cifar10`     torchvision's CIFAR-10 files under `--data-dir` (downloaded when missing);
- `imagefolder` `DIR/train/<class>/*` and, when present, `DIR/test/<class>/*`;
- `synthetic`   deterministic, learnable class-conditional images made here (tests, smoke runs).

Why in memory: the tutorial decodes every image with PIL on every epoch, which dominates a CPU
epoch for a 62k-parameter net. Here a split is decoded once into an N×3×32×32 uint8 tensor (image
folders are cached on disk, keyed by a hash of their files' names and bytes), and a batch is one
tensor index plus vectorized augmentation. Batches still go through a `DataLoader`, so
`accelerator.prepare` shards them across processes as usual.

On an accelerator the split's uint8 tensor is moved to the device once (`make_loader(device=...)`),
and indexing, crop + flip and normalization run there: per batch only the indices (8 bytes each)
cross from the host, from pinned memory so the copy does not wait for the GPU. On the CPU it is the
same code with the CPU as the device, which is how CI tests the GPU path.

Determinism: the shuffle order and the augmentation of every image depend only on
(seed, epoch, image index), never on the global RNG or on how many processes there are. That makes
resume bit-exact and lets 2 processes × batch B see exactly the images of 1 process × batch 2B.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from toolkit.core.errors import DataError, first_line
from toolkit.core.images import IMAGE_EXTENSIONS, IMAGE_SIZE, MEAN, STD, decode_image
from toolkit.training.config import DataConfig

CROP_PADDING = 4  # default pixels of zero padding before the random 32×32 crop (--crop-padding)
_CACHE_VERSION = 1  # bump when the cached tensor layout changes


@dataclass
class Split:
    """Images of one split: `images` N×3×32×32 uint8, `labels` N int64, class names by label."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"{self.name} split: expected N×3×H×W uint8 images, got "
                            f"{tuple(self.images.shape)} {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name} split: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, name: str, index: torch.Tensor) -> Split:
        return Split(name, self.images[index], self.labels[index], self.classes)


@dataclass
class Splits:
    """Training split, validation hold-out (may be empty) and the test split (None if the source has none)."""

    train: Split
    val: Split
    test: Split | None
    source: str

    def held_out(self, which: str) -> tuple[Split, str | None]:
        """The split to evaluate on, and a note when `test` had to fall back to `val`."""
        if which == "val" or self.test is None:
            if len(self.val) == 0:
                raise DataError(f"{self.source} has no test split and the validation split is empty; "
                                "set --val-fraction > 0 to hold out images for evaluation")
            note = None if which == "val" else f"{self.source} has no test split: evaluating on the validation split"
            return self.val, note
        if which != "test":
            raise DataError(f"--split: expected 'test' or 'val', got {which!r}")
        return self.test, None


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalization constants as 1×3×1×1 tensors on `device`, made once per device: creating them
    per batch would copy from the host every step."""
    return (torch.tensor(MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, dtype=torch.float32, device=device).view(1, 3, 1, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> float32 normalized as in training ((x/255 - mean) / std), on the images' device."""
    mean, std = _mean_std(images.device)
    return (images.float().div_(255.0) - mean) / std


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                  padding: int = CROP_PADDING) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip for a whole uint8 batch in one gather, on its device.

    `offsets` N×2 are the (row, col) of each crop in the padded image, in [0, 2*padding];
    `flips` N bool. Matches torchvision's RandomCrop(32, padding=padding) + RandomHorizontalFlip.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[:, 0:1] + torch.arange(h, device=device)  # N×H
    cols = offsets[:, 1:2] + torch.arange(w, device=device)  # N×W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(3, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class BatchedImages(Dataset):
    """A `Split` served a batch at a time: `DataLoader` calls `__getitems__` with a batch's indices.

    The images, labels and this epoch's augmentation draws live on `device`; batches come out there, in
    `memory_format` (channels_last for a channels-last model: converted in the copy that normalizes them).
    """

    def __init__(self, split: Split, augment: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", crop_padding: int = CROP_PADDING,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.images = split.images.to(self.device)  # once per split: ~150 MB for CIFAR-10's training set
        self.labels = split.labels.to(self.device)
        self.augment = augment
        self.crop_padding = crop_padding
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crop offsets and flips for every image, from (seed, epoch) alone.

        Drawn on the CPU generator and then moved, so an image gets the same crop and flip on any device.
        """
        if not self.augment:
            return
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, stream=1))
        n = len(self.labels)
        self.offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g).to(self.device)
        self.flips = torch.randint(0, 2, (n,), generator=g).bool().to(self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.device.type == "cuda":
            # A copy from pinned memory is asynchronous; from pageable memory it waits for the GPU.
            index = index.pin_memory().to(self.device, non_blocking=True)
        else:
            index = index.to(self.device)
        images = self.images[index]
        if self.augment:
            images = crop_and_flip(images, self.offsets[index], self.flips[index], self.crop_padding)
        return normalize(images).contiguous(memory_format=self.memory_format), self.labels[index]

    def first_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `size` images (all, if fewer) as a batch, as the loader would serve them."""
        return self.__getitems__(list(range(min(size, len(self)))))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class EpochPermutation(Sampler[int]):
    """Shuffles with a generator seeded from (seed, epoch), so the order survives a restart.

    Accelerate's `DataLoaderShard.set_epoch` forwards to `set_epoch` here.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, stream=0))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _mix(seed: int, epoch: int, stream: int) -> int:
    """A distinct 63-bit generator seed per (seed, epoch, stream)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _already_batched(batch):
    return batch


def make_loader(split: Split, batch_size: int, *, shuffle: bool, augment: bool = False,
                seed: int = 0, device: torch.device | str = "cpu", crop_padding: int = CROP_PADDING,
                memory_format: torch.memory_format = torch.contiguous_format) -> DataLoader:
    """A DataLoader over `split` yielding (float32 normalized N×3×32×32 in `memory_format`, int64 N) batches on
    `device`."""
    dataset = BatchedImages(split, augment=augment, seed=seed, device=device, crop_padding=crop_padding,
                            memory_format=memory_format)
    sampler = EpochPermutation(len(split), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=_already_batched)


# ---------------------------------------------------------------------------------------------
# Sources


def load_splits(cfg: DataConfig) -> Splits:
    """Load the configured source and carve the stratified validation split from its train split."""
    if cfg.data == "cifar10":
        train, test = _load_cifar10(Path(cfg.data_dir), cfg.download)
    elif cfg.data == "imagefolder":
        train, test = _load_imagefolder(Path(cfg.data_dir), _cache_dir(cfg))
    else:
        train, test = make_synthetic(cfg.synthetic_train_size, cfg.synthetic_test_size)
    fit, val = stratified_holdout(train, cfg.val_fraction)
    return Splits(train=fit, val=val, test=test, source=f"{cfg.data}:{cfg.data_dir}" if cfg.data != "synthetic" else "synthetic")


def load_held_out(cfg: DataConfig, model_classes: list[str], split: str) -> tuple[Split, str | None]:
    """A held-out split (and its fallback note) of the data `cfg` describes, refused when its classes
    are not the ones the model was trained on."""
    splits = load_splits(cfg)
    if splits.train.classes != model_classes:
        raise DataError(f"data classes {splits.train.classes} differ from the model's {model_classes}")
    return splits.held_out(split)


def stratified_holdout(split: Split, fraction: float) -> tuple[Split, Split]:
    """Hold out the last round(fraction × n_c) images of every class c: deterministic, no RNG."""
    held = torch.zeros(len(split), dtype=torch.bool)
    for c in range(len(split.classes)):
        idx = (split.labels == c).nonzero().flatten()
        k = int(round(fraction * len(idx)))
        if k:
            held[idx[-k:]] = True
    return split.subset("train", (~held).nonzero().flatten()), split.subset("val", held.nonzero().flatten())


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar-toolkit"


def _load_cifar10(root: Path, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10  # here: torchvision takes ~1 s to import, and only this source needs it

    folder = root / CIFAR10.base_folder
    damaged = _damaged_cifar10_files(folder) if folder.is_dir() else []
    if damaged and not download:
        raise DataError(_damaged_message(folder, damaged))
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except (RuntimeError, OSError) as exc:  # not found, damaged / offline download
            if damaged:
                raise DataError(f"{_damaged_message(folder, damaged)}; downloading it again failed "
                                f"({first_line(exc)})") from None
            raise DataError(
                f"CIFAR-10 not found under {folder} and could not be downloaded "
                f"({first_line(exc)}). "
                "Point --data-dir at a folder holding cifar-10-batches-py, or at image folders with "
                "--data imagefolder (DIR/train/<class>/*)") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(Split("train" if train else "test", images, torch.tensor(ds.targets), list(ds.classes)))
    return splits[0], splits[1]


def _damaged_cifar10_files(folder: Path) -> list[str]:
    """'NAME (missing)' / 'NAME (corrupt)' for each file of a cifar-10-batches-py folder that fails
    torchvision's MD5 check, which torchvision itself reports only as "not found or corrupted"."""
    from torchvision.datasets import CIFAR10  # reason: as in _load_cifar10, only this source imports torchvision
    from torchvision.datasets.utils import check_integrity  # reason: the same

    expected = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return [f"{name} ({'corrupt' if (folder / name).exists() else 'missing'})"
            for name, md5 in expected if not check_integrity(str(folder / name), md5)]


def _damaged_message(folder: Path, damaged: list[str]) -> str:
    return (f"{folder} fails torchvision's integrity check (MD5): {', '.join(damaged)} (an interrupted download, "
            f"or a re-packed copy?). Delete {folder} and rerun to download CIFAR-10 again (--download, the default), "
            "or copy the original files there")


def _list_class_folders(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    files = {}
    for c in classes:
        files[c] = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files[c]:
            raise DataError(f"{root / c}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _load_imagefolder(root: Path, cache_dir: Path) -> tuple[Split, Split | None]:
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such folder (expected {root}/train/<class>/<image>)")
    if not (root / "train").is_dir():
        raise DataError(f"--data-dir {root}: no train/ folder (expected {root}/train/<class>/<image>)")
    train_files = _list_class_folders(root / "train")
    classes = list(train_files)
    test = None
    if (root / "test").is_dir():
        test_files = _list_class_folders(root / "test")
        unknown = sorted(set(test_files) - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'}: class folders {unknown} are not among the training classes {classes}")
        test = _decode_cached("test", test_files, classes, cache_dir)
    return _decode_cached("train", train_files, classes, cache_dir), test


def _decode_cached(name: str, files: dict[str, list[Path]], classes: list[str], cache_dir: Path) -> Split:
    """Decode an image-folder split once; later loads read the cache if no file name or byte changed."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}/{json.dumps(classes)}".encode())
    blobs: list[tuple[Path, bytes, int]] = []
    for label, c in enumerate(classes):
        for path in files.get(c, []):
            data = path.read_bytes()
            h.update(f"{c}/{path.name}/{len(data)}".encode())
            h.update(data)
            blobs.append((path, data, label))
    cache = cache_dir / f"imagefolder-{h.hexdigest()[:24]}.safetensors"
    if cache.exists():
        try:
            tensors = load_file(cache)
            return Split(name, tensors["images"], tensors["labels"], classes)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    # PIL releases the GIL while decoding, so threads decode in parallel (50,000 JPEGs: ~25 s on one core).
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda blob: decode_image(blob[1], source=str(blob[0])), blobs, chunksize=256)
        images = torch.from_numpy(np.stack(list(decoded))) if blobs else \
            torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    labels = torch.tensor([label for _, _, label in blobs], dtype=torch.long)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        save_file({"images": images, "labels": labels}, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # caching is an optimization; a read-only cache folder must not stop training
    return Split(name, images, labels, classes)


def make_synthetic(train_size: int, test_size: int, num_classes: int = 10) -> tuple[Split, Split]:
    """Class-conditional images: a fixed smooth random pattern per class plus per-image noise.

    Deterministic (fixed generator), learnable in a few hundred steps, and independent of --seed
    so that runs with different seeds see the same data.
    """
    g = torch.Generator().manual_seed(20240601)
    prototypes = torch.nn.functional.interpolate(
        torch.randn(num_classes, 3, 4, 4, generator=g), size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    classes = [f"class{i}" for i in range(num_classes)]

    def draw(name: str, n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        noise = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        pixels = 128 + 70 * prototypes[labels] + 25 * noise
        return Split(name, pixels.clamp(0, 255).round().to(torch.uint8), labels, classes)

    return draw("train", train_size), draw("test", test_size)


def write_imagefolder(split: Split, root: Path) -> None:
    """Write a split as `root/<class>/<index>.png` (used by tests and to hand data to other tools)."""
    for i, (img, label) in enumerate(zip(split.images, split.labels.tolist())):
        folder = root / split.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")

from pathlib import Path

import pytest
import torch

from toolkit.training.config import DataConfig
from toolkit.training.data import (BatchedImages, EpochPermutation, crop_and_flip, load_splits, make_loader,
                          make_synthetic, normalize, stratified_holdout, write_imagefolder)
from toolkit.core.errors import DataError


def test_normalize_maps_pixels_to_minus_one_one():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = normalize(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_synthetic_is_deterministic_and_balanced():
    a, test_a = make_synthetic(200, 50)
    b, _ = make_synthetic(200, 50)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.bincount(a.labels).tolist() == [20] * 10
    assert len(test_a) == 50 and not torch.equal(test_a.images[:5], a.images[:5])


def test_holdout_is_stratified_and_deterministic():
    train, _ = make_synthetic(400, 10)
    fit, val = stratified_holdout(train, 0.1)
    assert len(fit) == 360 and len(val) == 40
    assert torch.bincount(val.labels).tolist() == [4] * 10
    # The last images of each class are held out.
    for c in range(10):
        last = (train.labels == c).nonzero().flatten()[-4:]
        assert torch.equal(val.images[val.labels == c], train.images[last])


def test_crop_and_flip_matches_definition():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    centre = torch.full((3, 2), 4)
    no_flip = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(crop_and_flip(images, centre, no_flip), images)
    assert torch.equal(crop_and_flip(images, centre, ~no_flip), images.flip(3))
    shifted = crop_and_flip(images, torch.tensor([[0, 8]] * 3), no_flip)
    # Row offset 0 = 4 rows of padding on top; column offset 8 = shifted left by 4 with zero fill.
    assert torch.equal(shifted[:, :, 4:, :28], images[:, :, :28, 4:])
    assert shifted[:, :, :4].eq(0).all() and shifted[:, :, :, 28:].eq(0).all()


def test_augmentation_and_order_depend_only_on_seed_and_epoch():
    train, _ = make_synthetic(100, 10)
    ds1, ds2 = BatchedImages(train, augment=True, seed=3), BatchedImages(train, augment=True, seed=3)
    ds1.set_epoch(2), ds2.set_epoch(2)
    idx = [5, 1, 99]
    assert torch.equal(ds1.__getitems__(idx)[0], ds2.__getitems__(idx)[0])
    ds2.set_epoch(3)
    assert not torch.equal(ds1.__getitems__(idx)[0], ds2.__getitems__(idx)[0])
    # A sample's augmentation does not depend on which batch it is in.
    assert torch.equal(ds1.__getitems__([1])[0][0], ds1.__getitems__(idx)[0][1])
    s = EpochPermutation(100, seed=3)
    s.set_epoch(1)
    first = list(s)
    assert sorted(first) == list(range(100)) and first == list(s)
    s.set_epoch(2)
    assert list(s) != first


def test_channels_last_batches_hold_the_same_values_in_the_models_layout():
    train, _ = make_synthetic(40, 10)
    plain, last = (make_loader(train, 16, shuffle=True, augment=True, seed=1, memory_format=layout)
                   for layout in (torch.contiguous_format, torch.channels_last))
    for (x, y), (x_last, y_last) in zip(plain, last):
        assert x.is_contiguous() and not x_last.is_contiguous()
        assert x_last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, x_last) and torch.equal(y, y_last)
    first, labels = last.dataset.first_batch(100)  # more than the split holds: all of it
    assert first.shape == (40, 3, 32, 32) and first.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, last.dataset.__getitems__(list(range(40)))[0]) and len(labels) == 40


def _imagefolder(root: Path, with_test: bool = True) -> None:
    train, test = make_synthetic(60, 20)
    write_imagefolder(train, root / "train")
    if with_test:
        write_imagefolder(test, root / "test")


def test_imagefolder_loads_and_caches(tmp_path):
    _imagefolder(tmp_path / "ds")
    cfg = DataConfig(data="imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.5)
    splits = load_splits(cfg)
    assert splits.train.classes == [f"class{i}" for i in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 30, 20)
    reference, _ = make_synthetic(60, 20)
    order = torch.argsort(reference.labels, stable=True)  # folders are read class by class
    fit_and_val = torch.cat([splits.train.images, splits.val.images])
    assert sorted(map(bytes, fit_and_val.flatten(1).numpy())) == sorted(map(bytes, reference.images[order].flatten(1).numpy()))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    again = load_splits(cfg)
    assert torch.equal(again.train.images, splits.train.images)
    test_split, note = splits.held_out("test")
    assert test_split.name == "test" and note is None


def test_imagefolder_without_test_folder_evaluates_on_val(tmp_path):
    _imagefolder(tmp_path / "ds", with_test=False)
    splits = load_splits(DataConfig(data="imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c")))
    split, note = splits.held_out("test")
    assert split.name == "val" and "validation split" in note


def test_imagefolder_cache_follows_content(tmp_path):
    _imagefolder(tmp_path / "ds", with_test=False)
    cfg = DataConfig(data="imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"), val_fraction=0)
    before = load_splits(cfg).train.images.clone()
    victim = sorted((tmp_path / "ds" / "train" / "class0").iterdir())[0]
    from PIL import Image
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim)
    after = load_splits(cfg).train.images
    assert not torch.equal(before, after)
    assert torch.equal(after[0], torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no such folder"),
    (lambda root: root.mkdir(), "no train/ folder"),
    (lambda root: (root / "train").mkdir(parents=True), "no class folders"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True), "holds no images"),
])
def test_imagefolder_bad_layouts_are_clear_errors(tmp_path, setup, message):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(data="imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c")))


def test_imagefolder_unknown_test_class_is_an_error(tmp_path):
    _imagefolder(tmp_path / "ds")
    (tmp_path / "ds" / "test" / "class0").rename(tmp_path / "ds" / "test" / "unicorn")
    with pytest.raises(DataError, match="unicorn"):
        load_splits(DataConfig(data="imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c")))


def test_unreadable_image_names_the_file(tmp_path):
    _imagefolder(tmp_path / "ds", with_test=False)
    (tmp_path / "ds" / "train" / "class3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_splits(DataConfig(data="imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "c")))


def test_missing_cifar10_offline_says_how_to_point_at_a_copy(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_splits(DataConfig(data="cifar10", data_dir=str(tmp_path / "nothing"), download=False))


def test_damaged_cifar10_names_the_file_that_fails_the_integrity_check(tmp_path):
    """Every file present but one, none with torchvision's MD5 (a re-packed copy, an interrupted download)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "batches.meta"):
        (folder / name).write_bytes(b"not the original bytes")
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(data="cifar10", data_dir=str(tmp_path), download=False))
    message = str(caught.value)
    assert f"{folder} fails torchvision's integrity check" in message
    assert "data_batch_2 (corrupt)" in message and "test_batch (missing)" in message
    assert f"Delete {folder}" in message and "not found" not in message

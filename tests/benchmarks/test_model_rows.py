"""benchmarks/model_rows.py: every built-in model has benchmark rows, the heavy ones fewer; and the check that
an untrained model's reduced-precision logits must pass before they are timed (benchmarks/common.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import check_against_eager
from benchmarks.model_rows import MODEL_ROWS, TRAIN_BATCH, ModelRows
from toolkit.artifacts import formats
from toolkit.core.errors import ConfigError
from toolkit.training.models import MODELS


def test_every_built_in_model_has_rows() -> None:
    assert set(MODEL_ROWS) == set(MODELS)
    for rows in MODEL_ROWS.values():
        assert rows.inference_cases() and rows.train
        assert {layout for _, layout in rows.train} == {"contiguous", "channels_last"}
        assert TRAIN_BATCH in {batch for batch, _ in rows.train}  # one batch every model is measured at


def test_heavy_models_get_fewer_rows_not_none() -> None:
    tutorial = MODEL_ROWS["tutorial"].inference_cases()
    assert len(tutorial) == (3 * 2 + 3 * 3) * 3  # torch formats × 2 thread settings, ORT × 3; × batch 1, 64, 1024
    for name in ("speednet", "resnet18"):
        rows = MODEL_ROWS[name]
        cases = rows.inference_cases()
        assert not rows.trained and len(cases) < len(tutorial)
        assert {f for f, _, _ in cases} == {f.name for f in formats.FORMATS} - {"pt2"}
        assert {b for _, _, b in cases} == {1, 64} and {t for _, t, _ in cases} == {1, "all"}
        assert rows.train_rounds is not None  # a few whole steps, not a second's worth of calibrated rounds


def test_rows_refuse_unknown_names() -> None:
    base = dict(trained=False, formats=("eager",), batches=(1,), torch_threads=(1,), ort_threads=(1,), min_rounds=3,
                check_images=8, train=((8, "contiguous"),), train_rounds=None)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        ModelRows("vgg", **base)
    with pytest.raises(ConfigError, match=r"unknown formats \['onnx-int4'\]"):
        ModelRows("resnet18", **{**base, "formats": ("eager", "onnx-int4")})
    with pytest.raises(ConfigError, match=r"unknown memory formats \['nhwc'\]"):
        ModelRows("resnet18", **{**base, "train": ((8, "nhwc"),)})
    with pytest.raises(ConfigError, match="trains 'tutorial' only"):
        ModelRows("resnet18", **{**base, "trained": True})
    with pytest.raises(ConfigError, match="must be >= 1"):
        ModelRows("resnet18", **{**base, "min_rounds": 0})


def test_untrained_reduced_precision_is_held_to_eager_logits() -> None:
    rng = np.random.default_rng(0)
    # An untrained model: nearly the same logits for every image, so classes cannot tell a wrong file apart.
    eager = (0.05 + 0.001 * rng.standard_normal((64, 10))).astype(np.float32)
    close = eager + 0.002  # 4 % of eager's largest |logit|
    check_against_eager("onnx-int8", close, eager, trained=False)
    with pytest.raises(AssertionError, match="onnx-int8 logits differ from eager's"):
        check_against_eager("onnx-int8", np.zeros_like(eager), eager, trained=False)
    with pytest.raises(AssertionError, match="onnx-fp16 logits differ from eager's"):
        check_against_eager("onnx-fp16", eager * 1.5, eager, trained=False)
    # fp32 formats keep the verify tolerance, trained or not.
    with pytest.raises(AssertionError, match="onnx logits differ from eager's"):
        check_against_eager("onnx", close, eager, trained=False)

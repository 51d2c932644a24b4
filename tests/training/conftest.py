"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps its state in process-wide singletons: a test starts with none and leaves none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def accelerator(fresh_accelerate) -> Accelerator:
    """A single-process Accelerator on the CPU, as `toolkit train` builds one without a launcher."""
    return Accelerator(cpu=True)

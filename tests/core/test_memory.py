"""toolkit.core.memory: freed big blocks are reused by the next allocation, not faulted in from the kernel again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from toolkit.core.memory import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="keep_freed_memory changes glibc's malloc only")

# Holds a 64 MiB block (above glibc's largest mmap threshold, like a training step's activations), then frees it,
# and prints where glibc put it (mallinfo2: bytes in mmap'd blocks, bytes of free heap).
_PROBE = """
import ctypes, json, sys
import numpy as np
from toolkit.core.memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
block = np.ones(64 << 20, np.uint8)
mapped = libc.mallinfo2().hblkhd
del block
print(json.dumps({"applied": applied, "mapped_while_held": mapped, "heap_free_after": libc.mallinfo2().fordblks}))
"""
BLOCK = 64 << 20


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@glibc_only
def test_a_freed_big_block_stays_in_the_heap_for_the_next_step() -> None:
    kept = _probe("keep")
    assert kept["applied"] is True
    assert kept["mapped_while_held"] < BLOCK  # served from the heap, not a private mapping
    assert kept["heap_free_after"] >= BLOCK  # and kept there once freed, ready for the next allocation


@glibc_only
def test_by_default_glibc_maps_and_unmaps_it() -> None:
    """The control: without keep_freed_memory the same block is a mapping of its own, returned on free."""
    default = _probe("default")
    assert default["mapped_while_held"] >= BLOCK
    assert default["heap_free_after"] < BLOCK


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False

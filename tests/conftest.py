"""Shared fixtures. Helper functions live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TRAIN_ARGS, Export, assert_ok, run_cli


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """One tiny trained run, exported in every format once per session (the real CLI, as a user would)."""
    base = tmp_path_factory.mktemp("export")
    run, out = base / "run", base / "export"
    assert_ok(run_cli("train", *TRAIN_ARGS, "--output-dir", str(run), "--cache-dir", str(base / "cache")))
    proc = run_cli("export", "--run", str(run), "--out", str(out))
    assert_ok(proc)
    return Export(run, out, proc.stdout + proc.stderr)

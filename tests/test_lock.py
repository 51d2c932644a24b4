"""requirements.lock against pyproject.toml: every declared dependency is pinned, inside its declared range."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement

from tests.helpers import ROOT
from tests.lock import canonicalize_name, mismatches, pins_from_report, read_lock

LOCK = read_lock(ROOT / "requirements.lock")


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(line) for line in [*project["dependencies"], *extras["cpu"], *extras["dev"]]]


@pytest.mark.parametrize("requirement", _declared(), ids=str)
def test_every_declared_dependency_is_locked_inside_its_range(requirement: Requirement) -> None:
    name = canonicalize_name(requirement.name)
    assert name in LOCK, f"{requirement} is not in requirements.lock: run `make lock`"
    assert requirement.specifier.contains(LOCK[name], prereleases=True), \
        f"requirements.lock pins {name}=={LOCK[name]}, outside {requirement}: run `make lock`"


def test_pins_come_from_pips_report_without_the_project_itself() -> None:
    report = {"install": [
        {"metadata": {"name": "PyYAML", "version": "6.0.4"}, "download_info": {"url": "https://x/pyyaml.whl"}},
        {"metadata": {"name": "ml_dtypes", "version": "0.7.0"}, "download_info": {"url": "https://x/ml.whl"}},
        {"metadata": {"name": "cifar-toolkit", "version": "0.1.0"},
         "download_info": {"url": "file:///src", "dir_info": {"editable": True}}},
    ]}
    assert pins_from_report(report) == ["ml-dtypes==0.7.0", "pyyaml==6.0.4"]


def test_a_version_other_than_the_locked_one_is_reported() -> None:
    assert mismatches({"pytest": "0.0.1", "no-such-package-anywhere": "1.0"}) == [
        f"pytest: installed {pytest.__version__}, locked 0.0.1"]

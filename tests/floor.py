"""Print pip constraints pinning every dependency of pyproject.toml (and its `cpu` and `dev` extras) to the lowest
version the project declares: `make test-floor` installs them into .venv-floor and runs the suite,
so the floor of every declared range is a tested version, not a guess."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def floors() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    extras = project["optional-dependencies"]
    for line in [*project["dependencies"], *extras["cpu"], *extras["dev"]]:
        req = Requirement(line)
        lowest = [s.version for s in req.specifier if s.operator == ">="]
        if not lowest:
            raise SystemExit(f"pyproject.toml: {line!r} declares no lower bound (>=)")
        out.append(f"{req.name}=={lowest[0]}")
    return out


if __name__ == "__main__":
    print("\n".join(floors()))

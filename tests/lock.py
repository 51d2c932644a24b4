"""The lock file: every package `make test` and `make run` install, pinned `name==version`.

    python tests/lock.py write REPORT > requirements.lock   # from `pip install --dry-run --report REPORT`
    python tests/lock.py check requirements.lock            # the running interpreter has exactly those pins

`make lock` resolves pyproject.toml's dependencies with the `cpu` and `dev` extras with pip itself, in a
scratch virtual environment, and writes what pip would install. pip rather than pip-tools: pip applies
the machine's own pip configuration (a local wheel store, a cap on torch releases), which pip-compile
ignores; the lock is then exactly what pip installs. `make test` installs with the lock as constraints,
so a release published after the lock changes nothing until `make lock` is run again and tested.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# Every package `make test` and `make run` install (pyproject.toml with the cpu and dev extras), pinned.
# Written by `make lock` from pip's own resolution (tests/lock.py); used as pip constraints.
# Resolved for Python {python} on {platform}.
"""


def canonicalize_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `PyYAML` and `pyyaml`, `ml_dtypes` and `ml-dtypes` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_report(report: dict) -> list[str]:
    """`name==version` for every package of a `pip install --report`, except the project installed from source."""
    pins = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
            for item in report["install"] if "dir_info" not in item.get("download_info", {})}
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of a lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def mismatches(lock: dict[str, str]) -> list[str]:
    """Installed distributions whose version differs from the lock's pin (packages not installed are not listed:
    the lock covers every extra, an environment may have fewer)."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return [f"{name}: installed {installed[name]}, locked {version}"
            for name, version in sorted(lock.items()) if name in installed and installed[name] != version]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "write":
        report = json.loads(Path(argv[1]).read_text())
        env = report["environment"]
        print(HEADER.format(python=env["python_version"], platform=f"{env['sys_platform']} {env['platform_machine']}")
              + "\n".join(pins_from_report(report)))
        return 0
    wrong = mismatches(read_lock(Path(argv[1])))
    for line in wrong:
        print(f"{argv[1]}: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

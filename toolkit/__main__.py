"""`python -m toolkit ...` — the entry point `accelerate launch -m toolkit` uses."""

from toolkit.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C).

The first signal only sets a flag: the training loop finishes its current step, all processes
agree (one all-reduce per step), a checkpoint is written and the run exits with
`Interrupted.exit_code`. A second signal exits at once with the conventional 128 + signal number.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class GracefulStop:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # second signal: no checkpoint, no clean-up
        self.received = signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

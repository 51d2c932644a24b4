"""Graceful stop on SIGTERM / SIGINT / SIGUSR1 (pre-emption, Ctrl-C, SLURM's `--signal` warning).

The first signal only sets a flag: at the training loop's next flag check (at most
`toolkit.training.train.CHECK_EVERY` steps later) all processes agree on it in one all-reduce, a
checkpoint is written and the run exits with `Interrupted.exit_code`. The same signal again within `REPEAT_S` is the same request delivered
twice: a scheduler signals every process of a job step and the launcher (torchrun's agent)
forwards what it received, so each worker can see a signal twice within milliseconds. Any other
signal, or a repeat after that, exits at once with the conventional 128 + signal number.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType


class GracefulStop:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    REPEAT_S = 2.0  # seconds: a repeat of the first signal within this is a duplicate delivery, ignored

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
        elif signum != self.received or time.monotonic() - self._received_at > self.REPEAT_S:
            os._exit(128 + signum)  # a second request: no checkpoint, no clean-up

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Training progress for people: a tqdm bar on a terminal, plain lines elsewhere.

Only the main process reports. The bar shows epoch, step, loss, lr, images/s and ETA; when
stdout is not a terminal (CI, log files) or with `--quiet`, one plain line is printed every
`--log-every` steps instead, with no control characters.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, initial_step: int, enabled: bool, quiet: bool, log_every: int) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.log_every = log_every
        self.start = time.perf_counter()
        self.start_step = initial_step
        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=sys.stdout) \
            if enabled and not quiet and sys.stdout.isatty() else None

    def step(self, step: int, epoch: int, epochs: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}", refresh=False)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"epoch {epoch}/{epochs} step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                  f"{images_per_s:.0f} img/s eta {eta:.0f} s", flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

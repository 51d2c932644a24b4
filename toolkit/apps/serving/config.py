"""`toolkit serve`'s settings (`ServeConfig`), apart from the server so that the command line reads the
defaults without importing the serve extra."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.artifacts.backends import DEFAULT_PROVIDER, PROVIDERS
from toolkit.core.errors import ConfigError


@dataclass
class ServeConfig:
    """`toolkit serve`'s settings; every value checked here."""

    paths: list[Path]
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = DEFAULT_PROVIDER
    threads: int | None = None  # intra-op threads per session (None: the CPU cores shared among the instances)
    instances: int = 1  # sessions per model, each running one batch at a time
    max_batch_size: int = 64  # images per model execution; the CPU provider's slice size (onnx_runtime.SLICE)
    max_queue_delay_ms: float = 0.0  # 0: a batch never waits while a session is idle
    max_queue: int = 1024  # requests waiting per model before 503
    timeout_ms: float = 30_000.0  # 0: no limit
    max_request_bytes: int = 16 * 2 ** 20  # a 64-image FP32 request is 0.8 MB in binary, about 4 MB as JSON
    shutdown_timeout: float = 30.0  # seconds
    api_key: str | None = None
    check_hash: bool = True

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        if not self.paths:
            raise ConfigError("no models given: pass export folders or .onnx files")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be 0..65535, got {self.port}")
        if self.provider not in PROVIDERS:
            raise ConfigError(f"--provider: expected one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        for flag, value, low in (("--threads", self.threads, 1), ("--instances", self.instances, 1),
                                 ("--max-batch-size", self.max_batch_size, 1), ("--max-queue", self.max_queue, 1),
                                 ("--max-request-bytes", self.max_request_bytes, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{flag}: must be >= {low}, got {value}")
        for flag, number in (("--max-queue-delay-ms", self.max_queue_delay_ms), ("--timeout-ms", self.timeout_ms),
                             ("--shutdown-timeout", self.shutdown_timeout)):
            if not (math.isfinite(number) and number >= 0):
                raise ConfigError(f"{flag}: must be a finite number >= 0, got {number}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key: must not be empty")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServeConfig) if f.default is not dataclasses.MISSING}

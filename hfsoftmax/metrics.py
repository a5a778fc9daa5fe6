"""Run metrics: JSON lines (``metrics.jsonl``, one object per event, rank 0), optional TensorBoard
scalars beside them, and a plain progress line per log step when stdout is not a terminal."""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from .config import ConfigError


class LineProgress:
    """tqdm's update / set_postfix / close for a stdout that is not a terminal: set_postfix (called
    every log_every steps) prints one line with the step, the figures and the ETA."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.n, self.n0, self.t0 = int(total), int(initial), int(initial), time.time()

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix(self, **fields: Any) -> None:
        done = self.n + 1
        rate = (done - self.n0) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        print(f"train step {done}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
              + f" eta {eta:.0f}s", file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class MetricsLogger:
    """JSON lines, one object per event, on rank 0 only; with ``tensorboard_dir`` the numbers of the
    ``train`` and ``eval`` records also go to TensorBoard as scalars ``<event>/<key>`` at their step."""

    def __init__(self, path: str, tensorboard_dir: str | None = None) -> None:
        self.f = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter   # checked by tensorboard_available()
            self.tb = SummaryWriter(tensorboard_dir)

    def log(self, **record: Any) -> None:
        record.setdefault("time", time.time())
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None and record.get("event") in ("train", "eval") and "step" in record:
            for key, value in record.items():
                if key not in ("event", "step", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.tb.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def require_tensorboard() -> None:
    """train.tensorboard=true without the package: a one-line error saying what to install."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                          "pip install -e '.[tensorboard]' (or pip install tensorboard)") from None

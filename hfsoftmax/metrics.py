"""Run metrics: JSON lines (``metrics.jsonl``, one object per event, rank 0), optional TensorBoard
scalars beside them, and a plain progress line per log step when stdout is not a terminal."""
from __future__ import annotations

import json
import math
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


class LossWatch:
    """Notices a run that does not learn, from the mean loss of each log interval (rank 0).

    Two signs, the first one seen reported once, as one line naming the step, the figures and the likely
    causes:
    - **rising**: after warm-up the loss grew in each of ``patience`` consecutive intervals (by more
      than 1 % each time) -- the usual face of too high a learning rate;
    - **not learning**: after warm-up and at least ``2 * patience`` intervals, the loss is still within
      2 % of the first interval's (chance level: ln K for a plain head, more with a margin).

    Args:
        num_classes: K (for the message: chance is ln K for a plain softmax).
        warmup_steps: no judgement before this step (the lr is still rising).
        patience: intervals a sign must last.
    """

    def __init__(self, num_classes: int, warmup_steps: int = 0, patience: int = 3) -> None:
        self.ln_k = math.log(max(int(num_classes), 2))
        self.warmup, self.patience = int(warmup_steps), int(patience)
        self.first: float | None = None
        self.history: list[float] = []
        self.said: set[str] = set()

    def observe(self, step: int, loss: float) -> str | None:
        """The warning this interval's mean ``loss`` raises at ``step`` (None: nothing, or said before)."""
        if self.first is None:
            self.first = loss
        if step <= self.warmup or self.said:          # one line per run: a diverging loss is not learning either
            return None
        self.history.append(loss)
        h, p = self.history, self.patience
        causes = ("likely causes: optim.lr too high for this data and head (try 10x lower; the store's "
                  "unrolled momentum moves an active row by lr/(1-m) x its gradient at once), head.scale or "
                  "the margin too large for the task, labels that do not match the inputs")
        if "rising" not in self.said and len(h) > p and all(h[-i] > 1.01 * h[-i - 1] for i in range(1, p + 1)):
            self.said.add("rising")
            return (f"step {step}: the loss rose in each of the last {p} log intervals ({h[-p - 1]:.3f} -> "
                    f"{h[-1]:.3f}; ln K = {self.ln_k:.2f}): the run is diverging; {causes}")
        if "flat" not in self.said and len(h) >= 2 * p and h[-1] >= 0.98 * self.first:
            self.said.add("flat")
            return (f"step {step}: the loss ({h[-1]:.3f}) is where it started ({self.first:.3f}; ln K = "
                    f"{self.ln_k:.2f}) after {len(h)} log intervals past warm-up: the run is not learning; {causes}")
        return None

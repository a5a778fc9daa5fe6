"""LossWatch: a diverging or flat loss is said once, in one line; a learning run is left alone."""
from __future__ import annotations

import json
import math

from hfsoftmax.config import load_config
from hfsoftmax.metrics import LossWatch
from hfsoftmax.train import train


def run(losses: list[float], warmup: int = 0) -> list[str]:
    watch = LossWatch(1000, warmup_steps=warmup)
    return [w for i, x in enumerate(losses) if (w := watch.observe(20 * (i + 1), x)) is not None]


def test_rising_loss_is_said_once() -> None:
    said = run([7.0, 7.1, 7.5, 8.0, 8.6, 9.3, 10.1, 11.0])
    assert len(said) == 1 and "diverging" in said[0] and "optim.lr" in said[0]
    assert "ln K = 6.91" in said[0]


def test_flat_loss_is_said_and_learning_is_not() -> None:
    flat = run([6.91, 6.92, 6.90, 6.93, 6.91, 6.92, 6.90, 6.91])
    assert len(flat) == 1 and "not learning" in flat[0]
    learning = run([6.9 * math.exp(-0.1 * i) + 0.05 * (i % 2) for i in range(20)])   # noisy, falling
    assert learning == []
    assert run([9.0, 9.5, 10.0, 10.5, 11.0], warmup=200) == []                     # warm-up is not judged


def test_a_run_that_does_not_learn_logs_the_warning(tmp_path) -> None:
    """A real tiny run that cannot learn (lr 0): the warning reaches metrics.jsonl as an event of its own."""
    cfg = load_config(None, ["data.num_classes=40", "data.samples_per_class=4", "data.image_size=16",
                             "data.val_identities=10", "data.val_pairs=20", "model.feature_dim=16",
                             "train.progress=false", "train.log_every=2", "train.steps=24", "optim.lr=0.0",
                             "optim.warmup_steps=0", f"train.out_dir={tmp_path}"])
    train(cfg)                                           # lr 0: nothing moves, the loss stays at chance
    events = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    warnings = [e for e in events if e.get("event") == "warning"]
    assert len(warnings) == 1 and "not learning" in warnings[0]["message"]

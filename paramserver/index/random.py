"""RandomIndex: uniform random class ids (the Partial-FC style baseline with select_active)."""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import numpy as np

from .base import ClassIndex


class RandomIndex(ClassIndex):
    """Random class ids (uniform, with replacement; select_active removes duplicates), score 0.

    With `select_active` this gives the Partial-FC style baseline: the batch's labels plus random
    classes, at the same M as the smart selection.
    """

    name = "random"

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # numpy Generators are not thread-safe

    _OBJECTS = frozenset({"_rng"})

    def _objects(self) -> dict:
        import json
        return {"_rng": np.frombuffer(json.dumps(self._rng.bit_generator.state).encode(), dtype=np.uint8)}

    def _import_objects(self, arrays: dict) -> None:
        import json
        if "_rng" in arrays:
            self._rng.bit_generator.state = json.loads(bytes(np.asarray(arrays["_rng"], dtype=np.uint8)).decode())

    def build(self, W: np.ndarray) -> None:
        self.num_classes = self._check_W(W).shape[0]

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        with self._lock:
            ids = self._rng.integers(0, self.num_classes, size=(F.shape[0], n), dtype=np.int64)
        return ids + self.class_offset, np.zeros((F.shape[0], n), dtype=np.float32)

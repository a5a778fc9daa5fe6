"""The one interface every classifier head follows.

``loss = head(features, labels)`` trains, between ``begin_step`` and ``end_step`` (the train loop's
calls, with ``prefetch`` of the next step's labels after the forward; no-ops here, the selective
head plans, pushes and waits in them); ``head.scores(features)`` /
``head.topk(features, k)`` evaluate. ``scores`` returns a [B, K] tensor and is meant for small K; ``topk`` walks the classes in
blocks of ``block_size`` so that a [B, K] tensor never exists at once, which is what large-K
evaluation needs. Subclasses implement ``forward`` and ``scores_block``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Base class: a loss over K classes on d-dim features.

    ``store``: where W lives when not in this module (a :class:`paramserver.api.Store`), else None."""

    store: Any = None
    # W split by rows across the training ranks (store.kind=sharded): every rank writes and restores
    # its rows of a snapshot (:meth:`snapshot`, :meth:`restore`), and scoring over all K needs them all.
    sharded: bool = False

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        if num_classes <= 0 or feature_dim <= 0:
            raise ValueError(f"num_classes and feature_dim must be positive, got {num_classes}, {feature_dim}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:  # pragma: no cover
        """Scores of classes [start, end) for each feature: [B, end - start] (no margin applied)."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K] class scores; use :meth:`topk` when K is large."""
        return self.scores_block(features, 0, self.num_classes)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 5, block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (values, class ids) over all K classes, in blocks: memory O(B * (k + block_size))."""
        k = min(k, self.num_classes)
        best_v = best_i = None
        for start in range(0, self.num_classes, block_size):
            end = min(start + block_size, self.num_classes)
            s = self.scores_block(features, start, end)                       # [B, blk]
            v, i = s.topk(min(k, end - start), dim=1)
            i = i + start
            if best_v is None:
                best_v, best_i = v, i
            else:
                v = torch.cat([best_v, v], 1)
                i = torch.cat([best_i, i], 1)
                best_v, sel = v.topk(min(k, v.shape[1]), dim=1)  # block_size < k: fewer so far
                best_i = i.gather(1, sel)
        return best_v, best_i

    # -- the train loop's step protocol (defaults for heads whose W is an ordinary parameter) -----
    def begin_step(self, step: int, lr: float, grad_scale: Any = None, labels: torch.Tensor | None = None) -> None:
        """Before the forward of ``step``: its lr, the fp16 loss scale, the host labels."""

    def prefetch(self, step: int, labels: torch.Tensor) -> None:
        """After this step's forward: the host labels of the next ``step`` (the loader's, a batch
        ahead), for a head that can start on that step while this one computes."""

    def end_step(self, step: int, applied: bool = True) -> None:
        """After the optimizer step; ``applied``: whether it ran (False: the fp16 scaler skipped it)."""

    def flush(self) -> None:
        """Wait until this head's updates of W have landed (before a snapshot or an evaluation)."""

    def scores_alone(self) -> bool:
        """Whether this process can score features over all K by itself (rank 0's evaluations)."""
        return True

    def snapshot(self, path: str, prune_keep: Any = None) -> None:
        """A sharded head: every rank writes its rows into the store snapshot ``path``."""
        raise NotImplementedError(f"{type(self).__name__} keeps W in its parameters (the checkpoint holds it)")

    def restore(self, path: str) -> None:
        """A sharded head: every rank reads its rows of the store snapshot ``path``."""
        raise NotImplementedError(f"{type(self).__name__} keeps W in its parameters (the checkpoint holds it)")

    def stats(self) -> dict[str, Any]:
        """Figures for the metrics log (num_active, CPK, ...)."""
        return {}

    def close(self) -> None:
        """Release what the head holds beyond its parameters (a store's sockets, workers)."""

    def check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"{type(self).__name__}: features must be [B, {self.feature_dim}], "
                             f"got {tuple(features.shape)}")

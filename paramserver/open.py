"""Opening a store: what a store and its class index are made of, with every default declared ONCE
here, and the one builder :func:`open_store` that the trainer (``store.kind=local``), the server's
command line (``paramserver.py``) and the launcher (``hfsoftmax.launch``, which turns the same specs
into the server's flags) all go through.

``StoreSpec`` holds the shape, the initialisation and the SGD rule of W (the product's defaults:
momentum 0.9, weight decay 5e-4, unrolled sparse momentum); ``IndexSpec`` the class index and its
rebuild period. The mechanism classes below them (:class:`paramserver.store.WeightStore`,
:class:`paramserver.optim.SGDConfig`) keep torch.optim.SGD's semantics as their own defaults
("lazy" sparse momentum), which parity tests rely on; nothing of the product constructs them
without a spec.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Optional

from paramserver.store import WeightStore, shard_ranges

logger = logging.getLogger(__name__)

INDEX_NAMES = ("none", "exact", "forest", "hnsw", "ivf", "graph", "random")


@dataclass
class IndexSpec:
    """The class index of a store (``name`` "none": no index, no query op)."""

    name: str = "none"             # none | exact | forest | hnsw | ivf | graph | random
    metric: str = "angular"        # angular (margin heads) | dot (plain linear)
    rebuild_every: int = 100       # T: minimum applied steps between builds (builds never queue)
    deterministic: str = "auto"    # auto | on | off (see paramserver.index.manager)
    ntrees: int = 50               # forest: Annoy trees
    search_k: int = -1             # forest: Annoy search_k (-1: ntrees * n)
    nlist: int = 0                 # ivf, graph: k-means lists (0: about sqrt(rows))
    nprobe: int = 8                # ivf: lists probed per query; graph: per sample whose label row is cold
    degree: int = 32               # graph: neighbours kept per class

    def check(self) -> "IndexSpec":
        if self.name not in INDEX_NAMES:
            raise ValueError(f"index: unknown name {self.name!r} (choose {', '.join(INDEX_NAMES)})")
        if self.rebuild_every < 1:
            raise ValueError(f"index: rebuild_every must be >= 1, got {self.rebuild_every}")
        return self

    def cli_args(self) -> list[str]:
        """paramserver.py's flags for this spec."""
        if self.name == "none":
            return ["--index", "none"]
        from paramserver.index import index_cli_args
        return ["--index", self.name, "--metric", self.metric, "--rebuild-every", str(self.rebuild_every),
                "--deterministic", self.deterministic] + index_cli_args(self.name, self)

    def manager(self, dim: int, class_offset: int = 0, seed: int = 0) -> Any:
        """An IndexManager building this index over rows of width ``dim`` (bad options fail here, named)."""
        from paramserver.index import IndexManager, index_options, make_index
        from paramserver.index.manager import DETERMINISTIC_MODES

        opts = index_options(self.name, self)

        def factory() -> Any:
            return make_index(self.name, dim, self.metric, class_offset=class_offset, seed=seed, **opts)

        factory()
        return IndexManager(factory, rebuild_every=int(self.rebuild_every), background=True,
                            deterministic=DETERMINISTIC_MODES[self.deterministic])


@dataclass
class StoreSpec:
    """W of ``num_classes`` x ``dim`` (this process serves shard ``shard`` = (i, S) of it), its SGD rule."""

    num_classes: int = 0           # K of the whole matrix
    dim: int = 0                   # d
    dtype: str = "float32"
    init: str = "normal"
    init_std: float = 0.01
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    sparse_momentum: str = "unrolled"   # unrolled | lazy (paramserver/optim.py)
    exact_rounding: bool = False
    num_clients: int = 1           # R: clients whose pushes make one synchronous step
    sync_timeout: float = 60.0     # longest wait of a pull for its step (s)
    shard: tuple[int, int] = (0, 1)

    def optimizer(self) -> dict[str, Any]:
        """The SGD settings a client compares with the server's ``info.optimizer``."""
        return {"momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
                "nesterov": bool(self.nesterov), "sparse_momentum": self.sparse_momentum}

    def cli_args(self) -> list[str]:
        """paramserver.py's flags for this spec (shard and bind address are the caller's)."""
        args = ["--num-classes", str(self.num_classes), "--dim", str(self.dim), "--num-clients", str(self.num_clients),
                "--seed", str(self.seed), "--momentum", str(self.momentum), "--weight-decay", str(self.weight_decay),
                "--sparse-momentum", self.sparse_momentum]
        return args + (["--nesterov"] if self.nesterov else [])


def defaults(cls: type) -> dict[str, Any]:
    """The declared default of every field of a spec class (what the trainer's config and the server's
    flags take their defaults from)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def open_store(spec: StoreSpec, index: Optional[IndexSpec] = None, *, restore: Optional[str] = None,
               defer_init: bool = False, init_threads: int = 1) -> WeightStore:
    """The store of ``spec`` (its shard of the rows), with ``index`` attached and its first build started.

    ``restore``: a snapshot directory to start from instead (its shape and optimizer win; a class range
    other than the shard's is a ValueError). ``defer_init``: draw the rows in the background (a server
    answers at once and parks requests meanwhile). W lives in shared memory when an index is attached,
    so that builds in a child process map it (paramserver/shm.py). The first index build is synchronous
    only for a small W (the manager's rule); until it is live, selection fills at random.
    """
    index = (index or IndexSpec()).check()
    shared = index.name != "none"
    i, s = spec.shard
    if restore:
        store = WeightStore.from_snapshot(restore, num_clients=spec.num_clients, sync_timeout=spec.sync_timeout,
                                          shared_rows=shared)
        K = store.total_classes
        lo, hi = shard_ranges(K, s)[i]
        if store.class_range != (lo, hi):
            raise ValueError(f"restore {restore}: holds classes {store.class_range}, shard {i}/{s} of K={K} is {(lo, hi)}")
        for name, val, have in (("num_classes", spec.num_classes, K), ("dim", spec.dim, store.dim)):
            if val and val != have:
                raise ValueError(f"restore {restore}: snapshot has {name}={have}, the spec says {val}")
        have_opt = store.opt.to_dict()
        differ = {k: (have_opt[k], v) for k, v in spec.optimizer().items() if have_opt[k] != v}
        if differ:  # the snapshot's optimizer wins (its momentum matrix was made by it)
            logger.warning("restore %s: the snapshot's optimizer is used; it differs from the spec in %s "
                           "(snapshot, spec)", restore, differ)
    else:
        if spec.num_classes <= 0 or spec.dim <= 0:
            raise ValueError("a store needs num_classes and dim (unless restoring a snapshot)")
        lo, hi = shard_ranges(spec.num_classes, s)[i]
        store = WeightStore(hi - lo, spec.dim, dtype=spec.dtype, init=spec.init, init_std=spec.init_std,
                            seed=spec.seed, momentum=spec.momentum, weight_decay=spec.weight_decay,
                            nesterov=spec.nesterov, exact_rounding=spec.exact_rounding,
                            sparse_momentum=spec.sparse_momentum, num_clients=spec.num_clients,
                            sync_timeout=spec.sync_timeout, class_offset=lo, total_classes=spec.num_classes,
                            init_threads=init_threads, defer_init=defer_init, shared_rows=shared)
    if index.name != "none":
        lo, _ = store.class_range
        manager = index.manager(store.dim, class_offset=lo, seed=spec.seed)
        store.attach_index(manager)
        if store.rows_ready:
            manager.start(store.rows_view(), step=store.step)
        else:   # the first build starts once the deferred init has drawn the rows
            threading.Thread(target=lambda: (store.wait_rows(math.inf),
                                             manager.start(store.rows_view(), step=store.step)),
                             name="index-first-build", daemon=True).start()
        logger.info("index %s (%s) attached, rebuilt every >= %d steps", index.name, index.metric, index.rebuild_every)
    return store

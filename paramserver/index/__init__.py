"""Class indexes over the rows of W and the per-batch active-class selection of HF-softmax.

Implements the "dynamic class selection" of Zhang et al., AAAI 2018, "Accelerated Training for
Massive Classification via Dynamic Class Selection": per mini-batch, the softmax is computed over
only M << K "active" classes -- the batch's own labels plus the classes whose weight vectors score
highest against the batch features. The paper finds those classes with a hashing forest (Annoy)
rebuilt every T steps from the current W; this module provides that index and the alternatives we
compare it with, all behind one interface (`ClassIndex.build(W)`, `ClassIndex.query(F, n)`):

- `ExactIndex`:   blocked matmul top-n over all rows; the reference for recall (and CPK).
- `HashingForest`: Annoy random-projection forest (angular or dot), the paper's index
                   (default ntrees = 50, as in the paper's code).
- `HNSWIndex`:    hnswlib graph index (angular = cosine space, dot = inner-product space).
- `IVFIndex`:     inverted file (k-means centroids + faiss IndexIVFFlat). Incremental: a step
                   changes only the M pushed rows, and `update(ids, rows)` re-assigns just those rows
                   to their nearest centroid, so the index stays fresh at per-step cost; only the
                   centroids age, and they are re-clustered rarely in the background.
- `GraphIndex`:   class-neighbour graph (each class's nearest classes, built in the background by an
                   IVF kNN search of W against itself in grouped matmuls); a query scores the
                   neighbours of each sample's LABEL against its feature, so the per-step cost is
                   B x (degree + 1) rows whatever K is; samples whose label row is still untrained
                   go to an IVF kept beside it. Takes the batch labels (`query(F, n, labels)`).
                   The default from 100K classes.
- `RandomIndex`:  random class ids; with `select_active` this is the Partial-FC style random
                   sampling baseline at the same M.

`IndexManager` owns the live index of one store shard: it rebuilds in a background thread (Annoy's
build, hnswlib's add and all faiss calls release the GIL), never queues builds, swaps the new index
in atomically (each build an explicit record: building -> ready -> live), and reports build time,
achieved rebuild period and staleness. Builds whose loops hold the GIL (the forest's, the graph's)
run in a spawned child (`spawn.ChildBuild`), which maps W from shared memory when it lives there.

`select_active` turns per-feature candidates into exactly M unique active class ids (labels first)
and remaps the labels into 0..M-1.

This package never imports torch. annoy / faiss / hnswlib are imported lazily by the index that
needs them.
"""
from .base import METRICS, ClassIndex
from .exact import ExactIndex
from .forest import HashingForest
from .graph import GraphIndex
from .hnsw import HNSWIndex
from .ivf import IVFIndex
from .manager import IndexManager
from .random import RandomIndex
from .registry import LARGE_K, default_index_name, index_cli_args, index_options, make_index
from .selection import select_active

__all__ = ["METRICS", "ClassIndex", "ExactIndex", "HashingForest", "GraphIndex", "HNSWIndex", "IVFIndex",
           "IndexManager", "RandomIndex", "LARGE_K", "default_index_name", "index_cli_args", "index_options",
           "make_index", "select_active"]

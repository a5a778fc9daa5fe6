"""Indexes by name, their options, the default per K, and the one mapping from a head config to options."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .base import ClassIndex
from .exact import ExactIndex
from .forest import HashingForest
from .graph import GraphIndex
from .hnsw import HNSWIndex
from .ivf import IVFIndex
from .random import RandomIndex


_INDEXES: Dict[str, type] = {c.name: c for c in (ExactIndex, HashingForest, HNSWIndex, IVFIndex, GraphIndex,
                                                  RandomIndex)}
_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "exact": ("block_rows",),
    "forest": ("ntrees", "search_k", "subprocess"),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe", "niter", "train_points_per_centroid", "query_threads", "codec"),
    "graph": ("degree", "nlist", "probe", "hops", "cold_cos", "cold_nprobe", "cold_drift", "niter",
              "train_points_per_centroid", "subprocess", "cold_codec", "ivf_every"),
    "random": (),
}


# Why the graph from LARGE_K up: there IVF already beats the forest (it builds and queries faster,
# finds more of the true top-n with at least as much negative-class CPK, and stays fresh through
# per-step updates where the forest is a full rebuild behind), but IVF's per-feature scan still
# costs several times the M-row step itself. The graph index (label neighbours for warm samples,
# the IVF only for samples whose label row is still cold) keeps the step near the random-rows
# floor at any K, with CPK as high as IVF's and accuracy close to it. Below LARGE_K the forest,
# the paper's index, stays the default. The figures: docs/benchmarks.md (bench_index, bench_head,
# bench_accuracy).
LARGE_K = 100_000


def default_index_name(num_classes: int) -> str:
    """The index to use for K classes by default: "graph" for K >= LARGE_K, else "forest"."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return "graph" if num_classes >= LARGE_K else "forest"


def make_index(name: str, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
               build_threads: Optional[int] = None, **options: Any) -> ClassIndex:
    """Construct an index by name: "exact", "forest" (Annoy; ntrees=50, search_k=-1), "hnsw"
    (M, ef_construction, ef_search), "ivf" (nlist, nprobe, niter, train_points_per_centroid),
    "random". Unknown names or options raise ValueError naming them."""
    if name not in _INDEXES:
        raise ValueError(f"unknown index name {name!r}; choose one of {sorted(_INDEXES)}")
    bad = sorted(set(options) - set(_OPTIONS[name]))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for index {name!r}; allowed: {list(_OPTIONS[name])}")
    index: ClassIndex = _INDEXES[name](dim, metric, class_offset=class_offset, seed=seed, **options)
    if build_threads is not None:
        if build_threads < 1:
            raise ValueError(f"build_threads must be >= 1, got {build_threads}")
        index.build_threads = int(build_threads)
    return index


# The ONE mapping from the knobs a user sets (the head config's fields, paramserver.py's flags of the
# same names) to each index's make_index options. The head (embedded store), the server and the
# launcher's server arguments all go through it.
_KNOBS: Dict[str, Tuple[Tuple[str, str], ...]] = {   # index -> (knob, make_index option)
    "forest": (("ntrees", "ntrees"), ("search_k", "search_k")),
    "ivf": (("nlist", "nlist"), ("nprobe", "nprobe")),
    "graph": (("degree", "degree"), ("nlist", "nlist"), ("nprobe", "cold_nprobe")),
}


def _knob(knobs: Any, key: str) -> Any:
    return knobs[key] if isinstance(knobs, dict) else getattr(knobs, key)


def index_options(name: str, knobs: Any) -> Dict[str, Any]:
    """make_index options for index `name` from `knobs`: a head config (attributes ntrees, search_k,
    nlist, nprobe, degree), an argparse Namespace with the same names, or a dict. nlist 0 means None
    (about sqrt(K) lists); nprobe is the graph index's cold-path IVF probe count."""
    opts = {opt: int(_knob(knobs, knob)) for knob, opt in _KNOBS.get(name, ())}
    if "nlist" in opts:
        opts["nlist"] = opts["nlist"] or None
    return opts


def index_cli_args(name: str, knobs: Any) -> list:
    """The paramserver.py flags that give the server's index the options :func:`index_options` gives."""
    out: list = []
    for knob, _ in _KNOBS.get(name, ()):
        out += [f"--{knob.replace('_', '-')}", str(int(_knob(knobs, knob)))]
    return out

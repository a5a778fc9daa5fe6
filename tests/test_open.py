"""paramserver/open.py: one builder, every default declared once.

A store opened by the trainer from an empty config and one opened by ``paramserver.py`` from its
default flags (plus the launcher's arguments for that config) are the same store: same spec, same SGD
rule, same index and options."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hfsoftmax.config import Config
from hfsoftmax.dist import DistInfo
from hfsoftmax.heads.selective import index_spec, make_store, store_spec
from hfsoftmax.launch import server_args
from paramserver.open import IndexSpec, StoreSpec, defaults, open_store
from paramserver.paramserver import build_parser, open_from_args, specs

K, D = 300, 8


def _configs() -> list[Config]:
    hf = Config()
    hf.head.name, hf.head.num_active, hf.model.feature_dim, hf.store.kind = "hf", 30, D, "local"
    rnd = dataclasses.replace(hf, head=dataclasses.replace(hf.head, name="random"))
    graph = dataclasses.replace(hf, head=dataclasses.replace(hf.head, index="graph", margin="cosface"))
    return [hf, rnd, graph]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_trainer_and_server_open_the_same_store(which: int, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _configs()[which]
    monkeypatch.setattr("hfsoftmax.launch.num_classes_of", lambda c: K)
    trainer_store, trainer_index = store_spec(cfg, K), index_spec(cfg.head, K)
    args = build_parser().parse_args(server_args(cfg, 1))
    server_store, server_index = specs(args)
    # every field but the client's timeout (the trainer's store.timeout; the server keeps its own)
    assert dataclasses.replace(server_store, sync_timeout=0) == dataclasses.replace(trainer_store, sync_timeout=0)
    assert server_index == trainer_index
    local = make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))
    served = open_from_args(args)
    try:
        assert local.opt == served.opt and local.step == served.step == 0
        np.testing.assert_array_equal(local.pull(np.arange(K)), served.pull(np.arange(K)))
        assert (local.index is None) == (served.index is None) == (trainer_index.name == "none")
        if local.index is not None:
            assert local.index.rebuild_every == served.index.rebuild_every == cfg.head.rebuild_every
            assert local.index.factory().name == served.index.factory().name == trainer_index.name
    finally:
        local.close()
        served.close()


def test_each_default_is_declared_once() -> None:
    """The config's defaults, the server's flag defaults and the specs' are one set of values."""
    cfg, args = Config(), build_parser().parse_args([])
    store, index = defaults(StoreSpec), defaults(IndexSpec)
    assert cfg.optim.sparse_momentum == args.sparse_momentum == store["sparse_momentum"] == "unrolled"
    for key in ("momentum", "weight_decay", "nesterov"):
        assert getattr(cfg.optim, key) == getattr(args, key) == store[key], key
    for key in ("rebuild_every", "deterministic", "ntrees", "search_k", "nlist", "nprobe", "degree"):
        assert getattr(cfg.head, key) == getattr(args, key) == index[key], key
    for key in ("seed", "dtype", "init", "init_std", "num_clients", "sync_timeout", "shard"):
        assert getattr(args, key) == store[key], key
    assert args.index == index["name"] and args.metric == index["metric"]


def test_open_store_refuses_a_snapshot_of_another_shard(tmp_path) -> None:
    whole = open_store(StoreSpec(num_classes=10, dim=4))
    whole.snapshot(str(tmp_path / "snap"))
    with pytest.raises(ValueError, match=r"holds classes \(0, 10\), shard 1/2 of K=10 is \(5, 10\)"):
        open_store(StoreSpec(num_classes=10, dim=4, shard=(1, 2)), restore=str(tmp_path / "snap"))
    with pytest.raises(ValueError, match="snapshot has dim=4, the spec says 5"):
        open_store(StoreSpec(num_classes=10, dim=5), restore=str(tmp_path / "snap"))
    with pytest.raises(ValueError, match="unknown name 'annoy'"):
        open_store(StoreSpec(num_classes=10, dim=4), IndexSpec(name="annoy"))

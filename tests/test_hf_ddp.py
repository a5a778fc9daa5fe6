"""Synchronous HF-softmax over a live parameter server (Zhang et al., AAAI 2018): 2 gloo ranks, each
pushing its active rows' gradients / R, equal 1 process with the same global batch; a server that
dies mid-training stops the trainer with an error naming it; a server of other K or d is refused.

Servers are ``paramserver/paramserver.py`` subprocesses on free ports (port 0 + ready file) and are
always killed. M = K, so every rank's active set is all classes (the head's documented M == K
shortcut needs no index on the server) and the two runs differ only in how the batch is split.
"""
from __future__ import annotations

import contextlib
import subprocess
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hfsoftmax.backbones import get_backbone
from hfsoftmax.config import Config
from hfsoftmax.dist import DistInfo
from hfsoftmax.heads.selective import ParamServerLostError, SelectiveSoftmax, make_store
from hfsoftmax.train import Model
from paramserver.store import init_rows

from servers import free_port, launch_server, train_steps

K, D, IMG, GLOBAL_B, STEPS = 24, 16, 16, 8, 3
LRS = [0.2, 0.1, 0.05]          # a schedule: the server must apply each push's lr


@contextlib.contextmanager
def server(tmp_path, name: str, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A parameter server on a free 127.0.0.1 port; yields (process, address); always killed."""
    with launch_server(tmp_path, "--log-every", "0", "--seed", "5", *args, name=name) as pa:
        yield pa


def config(address: str, timeout: float = 30.0) -> Config:
    cfg = Config()
    cfg.model.feature_dim = D
    cfg.head.name, cfg.head.margin, cfg.head.scale, cfg.head.margin_m = "hf", "cosface", 8.0, 0.2
    cfg.head.num_active = K
    cfg.store.kind, cfg.store.address, cfg.store.timeout = "remote", address, timeout
    return cfg


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_B, 3, IMG, IMG, generator=g), torch.randint(0, K, (GLOBAL_B,), generator=g)


def train(address: str, rank: int, world: int) -> Model:
    """STEPS synchronous steps as hfsoftmax.train runs them; rank r takes samples r, r+R, ..."""
    torch.manual_seed(0)
    backbone = get_backbone("tiny", D, IMG, norm="group")     # GroupNorm: per-sample, DDP == 1 process
    cfg = config(address)
    store = make_store(cfg, K, DistInfo(rank, world, 0, torch.device("cpu")))
    head = SelectiveSoftmax.from_config(cfg.head, store, K, D, rank=rank, world_size=world)
    model = Model(backbone, head)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9, weight_decay=5e-4)
    train_steps(net, head, opt, rank, world, global_batch, LRS[:STEPS])
    return model


def _rank_main(rank: int, world: int, address: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = train(address, rank, world)
        dist.barrier()
        if rank == 0:
            W = model.head.store.pull(np.arange(K), step=STEPS)
            torch.save({"backbone": model.backbone.state_dict(), "W": W}, out)
        model.head.close()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path) -> None:
    common = ("--num-classes", str(K), "--dim", str(D), "--momentum", "0.9", "--weight-decay", "5e-4")
    out = str(tmp_path / "ddp.pt")
    with server(tmp_path, "ps2", *common, "--num-clients", "2") as (_, addr):
        mp.spawn(_rank_main, args=(2, addr, f"tcp://127.0.0.1:{free_port()}", out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    with server(tmp_path, "ps1", *common, "--num-clients", "1") as (_, addr):
        model = train(addr, 0, 1)
        W1 = model.head.store.pull(np.arange(K), step=STEPS)
        model.head.close()
    np.testing.assert_allclose(ddp["W"], W1, rtol=1e-4, atol=1e-6)
    init = get_backbone("tiny", D, IMG, norm="group")
    moved = 0.0
    for name, p in model.backbone.state_dict().items():
        torch.testing.assert_close(ddp["backbone"][name], p, rtol=1e-4, atol=1e-6, msg=name)
    for p, q in zip(model.backbone.parameters(), init.parameters()):
        moved = max(moved, (p - q).abs().max().item())
    W0 = init_rows(0, K, D, "float32", "normal", 0.01, 5)    # the servers' initial W (--seed 5)
    assert moved > 1e-3 and np.abs(W1 - W0).max() > 1e-3    # both W and the backbone trained


def test_server_dying_mid_training_names_the_server(tmp_path) -> None:
    with server(tmp_path, "ps", "--num-classes", str(K), "--dim", str(D)) as (proc, addr):
        cfg = config(addr, timeout=2.0)
        store = make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))
        head = SelectiveSoftmax.from_config(cfg.head, store, K, D)
        feats = torch.randn(4, D)
        head.begin_step(0, 0.1)
        head(feats.clone().requires_grad_(), torch.tensor([0, 1, 2, 3])).backward()
        head.end_step(0)
        proc.kill()
        proc.wait(timeout=10)
        head.begin_step(1, 0.1)
        with pytest.raises(ParamServerLostError, match=f"parameter server {addr}.*step 1"):
            head(feats.clone().requires_grad_(), torch.tensor([0, 1, 2, 3]))
        head.close()


def test_remote_store_with_other_sizes_is_refused(tmp_path) -> None:
    with server(tmp_path, "ps", "--num-classes", str(K + 1), "--dim", str(D)) as (_, addr):
        with pytest.raises(ValueError, match=rf"{addr}.*num_classes={K + 1}.*expected {K}"):
            make_store(config(addr), K, DistInfo(0, 1, 0, torch.device("cpu")))


def test_remote_selection_with_server_index_equals_local_store(tmp_path) -> None:
    """M < K through the server's --index: same active sets and W as an in-process store + index
    (no rebuild within the test: a background rebuild's timing would make the comparison racy)."""
    from paramserver.index import IndexManager, make_index
    from paramserver.store import WeightStore

    M, B = 10, 6
    args = ("--num-classes", str(K), "--dim", str(D), "--momentum", "0.9", "--weight-decay", "5e-4",
            "--index", "exact", "--metric", "angular", "--rebuild-every", "1000")
    local = WeightStore(K, D, momentum=0.9, weight_decay=5e-4, seed=5, sparse_momentum="unrolled")  # the server default
    mgr = IndexManager(lambda: make_index("exact", D, "angular", seed=5), rebuild_every=1000, background=False)
    mgr.build_now(local.rows_view(), step=0)
    local.attach_index(mgr)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(B, D, generator=g), torch.randint(0, K, (B,), generator=g)) for _ in range(4)]
    with server(tmp_path, "psi", *args) as (_, addr):
        cfg = config(addr)
        cfg.head.num_active, cfg.head.index, cfg.head.candidates = M, "exact", 3
        remote = make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))
        heads = [SelectiveSoftmax.from_config(cfg.head, st, K, D) for st in (local, remote)]
        for step, (f, y) in enumerate(batches):
            actives = []
            for h in heads:
                h.begin_step(step, 0.1)
                h(f.clone().requires_grad_(), y).backward()
                h.end_step(step)
                actives.append(h.last_active)
            np.testing.assert_array_equal(actives[0], actives[1])
        np.testing.assert_allclose(remote.pull(np.arange(K), step=4), local.pull(np.arange(K)), rtol=1e-5, atol=1e-7)
        heads[1].close()
    with server(tmp_path, "psn", "--num-classes", str(K), "--dim", str(D)) as (_, addr):
        cfg = config(addr)
        cfg.head.num_active = M
        with pytest.raises(ValueError, match=rf"{addr} has no class index.*--index forest --metric angular"):
            make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))

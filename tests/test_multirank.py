"""R ranks with batch b train exactly like one process with batch R*b, at M < K (issue: one active set
per global batch). Two gloo ranks against a 2-client parameter server vs one process against a
1-client server, for the random head, HF with the exact and the graph index, a margin head,
adaptive M, and the pipelined client on and off: backbone and W within 1e-5 after a few steps.

One ``mp.spawn`` runs every variant (a variant = its own pair of servers, served from threads of
the test process); the one-process references then run here.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hfsoftmax.backbones import get_backbone
from hfsoftmax.config import Config
from hfsoftmax.dist import DistInfo
from hfsoftmax.heads.selective import ParamServerLostError, SelectiveSoftmax, make_store
from hfsoftmax.train import Model, Precision
from paramserver.store import init_rows

from servers import free_port, thread_server, train_steps

K, D, IMG, GLOBAL_B, STEPS, M = 64, 16, 16, 8, 4, 12
LRS = [0.2, 0.1, 0.05, 0.05]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    head: str = "hf"
    index: str = "exact"
    margin: str = "cosface"
    pipeline: bool = True
    adaptive: bool = False
    prefetch: bool = True


VARIANTS = [
    Variant("random", head="random", index="random"),
    Variant("random_no_prefetch", head="random", index="random", prefetch=False),
    Variant("exact"),
    Variant("graph", index="graph", margin="none"),
    Variant("arcface_sync", margin="arcface", pipeline=False),
    Variant("adaptive", adaptive=True),
]


def server_args(v: Variant, clients: int) -> list[str]:
    args = ["--num-classes", str(K), "--dim", str(D), "--momentum", "0.9", "--weight-decay", "5e-4",
            "--seed", "5", "--num-clients", str(clients), "--rebuild-every", "1000"]
    if v.head == "hf":
        args += ["--index", v.index, "--metric", "dot" if v.margin == "none" else "angular"]
        if v.index == "graph":
            args += ["--degree", "8", "--nlist", "4"]
    return args


def config(v: Variant, address: str) -> Config:
    cfg = Config()
    cfg.model.feature_dim = D
    cfg.head.name, cfg.head.index, cfg.head.margin = v.head, v.index, v.margin
    cfg.head.scale, cfg.head.margin_m = 8.0, 0.2
    cfg.head.num_active, cfg.head.candidates, cfg.head.rebuild_every = M, 6, 1000
    if v.index == "graph":
        cfg.head.degree, cfg.head.nlist = 8, 4
    if v.adaptive:
        cfg.head.adaptive, cfg.head.cpk_every, cfg.head.tau_cp = True, 1, 0.5
        cfg.head.m_min, cfg.head.m_max = 10, 30
    cfg.store.kind, cfg.store.address, cfg.store.timeout = "remote", address, 30.0
    return cfg


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_B, 3, IMG, IMG, generator=g), torch.randint(0, K, (GLOBAL_B,), generator=g)


def train(v: Variant, address: str, rank: int, world: int) -> tuple[dict, np.ndarray, list]:
    """STEPS steps as hfsoftmax.train runs them; rank r takes global positions r, r+R, ..."""
    torch.manual_seed(0)
    backbone = get_backbone("tiny", D, IMG, norm="group")     # GroupNorm: per-sample, DDP == 1 process
    cfg = config(v, address)
    store = make_store(cfg, K, DistInfo(rank, world, 0, torch.device("cpu")))
    head = SelectiveSoftmax.from_config(cfg.head, store, K, D, rank=rank, world_size=world, pipeline=v.pipeline,
                                        prefetch=v.prefetch)
    model = Model(backbone, head)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9, weight_decay=5e-4)
    actives = train_steps(net, head, opt, rank, world, global_batch, LRS[:STEPS])
    head.flush()
    actives.append(head.stats().get("planned_ahead_steps", 0))
    W = store.pull(np.arange(K), step=STEPS)
    state = {k: t.clone() for k, t in backbone.state_dict().items()}
    head.close()
    return state, W, actives


def _rank_main(rank: int, world: int, addresses: list[str], init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {v.name: train(v, addr, rank, world) for v, addr in zip(VARIANTS, addresses)}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_at_m_below_k(tmp_path) -> None:
    out = str(tmp_path / "ddp.pt")
    with contextlib.ExitStack() as stack:
        addrs2 = [stack.enter_context(thread_server(*server_args(v, 2))) for v in VARIANTS]
        mp.spawn(_rank_main, args=(2, addrs2, f"tcp://127.0.0.1:{free_port()}", out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    for v in VARIANTS:
        with thread_server(*server_args(v, 1)) as addr:
            state, W, actives = train(v, addr, 0, 1)
        d_state, d_W, d_actives = ddp[v.name]
        ahead, d_ahead = actives.pop(), d_actives.pop()
        assert ahead == d_ahead == (STEPS - 1 if v.head == "random" and v.prefetch else 0), (v.name, ahead, d_ahead)
        for a, b in zip(actives, d_actives):
            np.testing.assert_array_equal(a, b, err_msg=f"{v.name}: active sets differ")
        assert all(len(a) < K for a in actives), v.name       # really M < K
        np.testing.assert_allclose(d_W, W, rtol=1e-5, atol=1e-5, err_msg=v.name)
        for name, p in state.items():
            torch.testing.assert_close(d_state[name], p, rtol=1e-5, atol=1e-5, msg=f"{v.name}: {name}")
        W0 = init_rows(0, K, D, "float32", "normal", 0.01, 5)       # the servers' initial W (--seed 5)
        assert np.abs(W - W0).max() > 1e-4, f"{v.name}: W did not train"
        if v.adaptive:
            assert all(10 <= len(a) <= 30 for a in actives), [len(a) for a in actives]
    # the design's step 5: planning the next step and pulling its early rows during this one changes
    # nothing, bitwise, with 2 gloo ranks
    on, off = ddp["random"], ddp["random_no_prefetch"]
    np.testing.assert_array_equal(on[1], off[1])
    for name, p in on[0].items():
        torch.testing.assert_close(p, off[0][name], rtol=0, atol=0, msg=name)


def test_pipelined_push_failure_names_the_server(tmp_path) -> None:
    """A server lost while a background push is in flight: the next step stops with its address."""
    v = Variant("lost", head="random", index="random")
    with thread_server(*server_args(v, 1)) as addr:
        cfg = config(v, addr)
        cfg.store.timeout = 1.5
        store = make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))
        head = SelectiveSoftmax.from_config(cfg.head, store, K, D, pipeline=True)
        feats, labels = torch.randn(4, D), torch.tensor([0, 1, 2, 3])
        head.begin_step(0, 0.1)
        loss = head(feats.clone().requires_grad_(), labels)
    # the server is stopped: the push the backward hands to the worker cannot be delivered
    loss.backward()
    head.end_step(0)
    head.begin_step(1, 0.1)
    with pytest.raises(ParamServerLostError, match=f"parameter server {addr}.*push at step"):
        head(feats.clone().requires_grad_(), labels)
    head.close()


def test_fp16_scale_is_divided_out_and_an_overflow_skips_the_update() -> None:
    """The head pushes grad / loss scale; a non-finite (overflowed) gradient leaves W untouched."""
    from paramserver.store import WeightStore

    ref, scaled = (WeightStore(K, D, seed=3, momentum=0.0, weight_decay=0.0) for _ in range(2))
    feats, labels = torch.randn(4, D, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 6, 7, 8])
    for store, scale in ((ref, None), (scaled, 1024.0)):
        head = SelectiveSoftmax(store, K, D, M, margin="none", index="random")
        head.begin_step(0, 0.5, grad_scale=scale)
        loss = head(feats.clone(), labels)
        (loss * (scale or 1.0)).backward()
        head.end_step(0)
    np.testing.assert_allclose(scaled.pull(np.arange(K)), ref.pull(np.arange(K)), rtol=1e-6, atol=1e-7)
    before = scaled.pull(np.arange(K))
    head = SelectiveSoftmax(scaled, K, D, M, margin="none", index="random")
    head.begin_step(1, 0.5, grad_scale=1.0)
    loss = head(feats.clone(), labels)
    (loss * float("inf")).backward()              # an fp16 overflow: inf / nan gradients
    head.end_step(1)
    assert scaled.step == 2                        # the step completed (empty update) ...
    np.testing.assert_array_equal(scaled.pull(np.arange(K)), before)   # ... and W is unchanged
    # the train loop's policy: a GradScaler only in fp16 mode, autocast dtypes as named
    assert Precision("fp16", torch.device("cpu")).scaler is not None
    assert Precision("bf16", torch.device("cpu")).scaler is None
    assert Precision("bf16", torch.device("cpu")).dtype == torch.bfloat16

"""W sharded by rows across the ranks (store.kind=sharded, hfsoftmax/heads/sharded.py).

- The distributed softmax (columns split unevenly across 2 gloo ranks) equals one cross-entropy.
- 2 sharded ranks with batch b train like one process with batch 2b and a local store, at M < K with
  K not divisible by R: the same active sets, backbone and W within 1e-5; random sampling (Partial
  FC's), HF with the exact index and a margin, the full softmax (M = K), the lazy momentum rule.
- Snapshots are the store's format: a 2-rank snapshot restores in a local store, on 1 and 3 ranks;
  a store snapshot (with momentum) restores sharded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hfsoftmax.backbones import get_backbone
from hfsoftmax.config import Config
from hfsoftmax.dist import DistInfo
from hfsoftmax.heads.collective import HeadComm
from hfsoftmax.heads.selective import SelectiveSoftmax, make_store, store_spec
from hfsoftmax.heads.sharded import DistCrossEntropy, ShardedRows, make_sharded_head, shard_range
from hfsoftmax.train import Model
from paramserver.open import open_store
from paramserver.optim import SGDConfig
from paramserver.snapshot import read_manifest

from servers import free_port, train_steps

K, D, IMG, GLOBAL_B, STEPS, M = 63, 16, 16, 8, 4, 12
LRS = [0.2, 0.1, 0.05, 0.05]
SPLIT = [3, 9]                      # the distributed CE test: columns of rank 0 and rank 1


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    head: str = "hf"
    index: str = "exact"
    margin: str = "cosface"
    momentum_rule: str = "unrolled"
    adaptive: bool = False


VARIANTS = [
    Variant("random", head="random", index="random"),
    Variant("exact_arcface", margin="arcface"),
    Variant("exact_plain_lazy", margin="none", momentum_rule="lazy"),
    Variant("full", head="full", margin="cosface"),
    Variant("graph", index="graph"),
    Variant("adaptive", adaptive=True),
]
LOCAL = [v for v in VARIANTS if v.index != "graph"]     # the graph's timeline is its own (see its test)


def config(v: Variant, kind: str) -> Config:
    cfg = Config()
    cfg.model.feature_dim = D
    cfg.train.seed = 5
    cfg.head.name, cfg.head.index, cfg.head.margin = v.head, v.index, v.margin
    cfg.head.scale, cfg.head.margin_m = 8.0, 0.2
    cfg.head.num_active, cfg.head.candidates = (K if v.head == "full" else M), 6
    cfg.optim.sparse_momentum = v.momentum_rule
    cfg.head.rebuild_every, cfg.head.degree, cfg.head.nlist = 2, 4, 4
    cfg.head.cpk_every = 2                       # a CPK probe at steps 0 and 2: measured, never steering
    if v.adaptive:                               # ... except here: M follows it (tau 0.5 within [10, 30])
        cfg.head.adaptive, cfg.head.tau_cp, cfg.head.m_min, cfg.head.m_max = True, 0.5, 10, 30
    cfg.store.kind = kind
    return cfg


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_B, 3, IMG, IMG, generator=g), torch.randint(0, K, (GLOBAL_B,), generator=g)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_backbone("tiny", D, IMG, norm="group")      # GroupNorm: per-sample, DDP == 1 process


def train_sharded(v: Variant, rank: int, world: int, snap: str) -> tuple[dict, list]:
    cfg = config(v, "sharded")
    head = make_sharded_head(cfg, K, torch.device("cpu"), rank=rank, world_size=world)
    model = Model(_model(), head)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9, weight_decay=5e-4)
    actives = train_steps(net, head, opt, rank, world, global_batch, LRS[:STEPS])
    head.snapshot(snap)
    if head.graph is not None:      # the live graph and when it went live
        actives.append((head.graph.part, head.graph.live_since, head.graph.builds))
    LAST_STATS.clear()
    LAST_STATS.update(head.stats())
    head.close()
    return {k: t.clone() for k, t in model.backbone.state_dict().items()}, actives


LAST_STATS: dict = {}                # the head's stats() at the end of the last train_sharded / train_local


def train_local(v: Variant) -> tuple[dict, np.ndarray, list]:
    cfg = config(v, "local")
    cfg.head.name = "hf" if v.head == "full" else v.head     # the full softmax = the store path at M = K
    store = make_store(cfg, K, DistInfo(0, 1, 0, torch.device("cpu")))
    head = SelectiveSoftmax.from_config(cfg.head, store, K, D, seed=cfg.train.seed)
    model = Model(_model(), head)
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9, weight_decay=5e-4)
    actives = train_steps(model, head, opt, 0, 1, global_batch, LRS[:STEPS])
    W = store.pull(np.arange(K))
    LAST_STATS.clear()
    LAST_STATS.update(head.stats())
    head.close()
    return {k: t.clone() for k, t in model.backbone.state_dict().items()}, W, actives


def dist_ce(rank: int, world: int, comm: HeadComm) -> tuple[float, torch.Tensor]:
    """This rank's columns of a fixed [6, 12] logit matrix; its loss and its columns' gradient."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, sum(SPLIT), generator=g, dtype=torch.float64) * 3
    target = torch.tensor([0, 2, 3, 11, 5, 2])
    lo = sum(SPLIT[:rank])
    mine = logits[:, lo:lo + SPLIT[rank]].clone().requires_grad_(True)
    t = torch.where((target >= lo) & (target < lo + SPLIT[rank]), target - lo, torch.full_like(target, -1))
    loss = DistCrossEntropy.apply(mine, t, comm)
    loss.backward()
    return float(loss.detach()), mine.grad


def _rank_main(rank: int, world: int, init: str, out: str, snaps: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {"ce": dist_ce(rank, world, HeadComm(rank, world))}
        for v, s in zip(VARIANTS, snaps):
            results[v.name] = train_sharded(v, rank, world, s)
            results[f"stats:{v.name}"] = dict(LAST_STATS)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("sharded")
    out = str(tmp / "ranks")
    snaps = [str(tmp / f"store_{v.name}") for v in VARIANTS]
    mp.spawn(_rank_main, args=(2, f"tcp://127.0.0.1:{free_port()}", out, snaps), nprocs=2, join=True)
    ranks = {r: torch.load(f"{out}.{r}", weights_only=False) for r in range(2)}
    return ranks, dict(zip([v.name for v in VARIANTS], snaps))


def test_distributed_cross_entropy_equals_one_cross_entropy(two_ranks) -> None:
    ranks, _ = two_ranks
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(6, sum(SPLIT), generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = F.cross_entropy(logits, torch.tensor([0, 2, 3, 11, 5, 2]))
    ref.backward()
    assert ranks[0]["ce"][0] == pytest.approx(float(ref), abs=1e-12)
    assert ranks[1]["ce"][0] == pytest.approx(float(ref), abs=1e-12)
    got = torch.cat([ranks[0]["ce"][1], ranks[1]["ce"][1]], dim=1)
    torch.testing.assert_close(got, logits.grad, rtol=0, atol=1e-12)
    # one process: the same function is the plain cross-entropy
    one = logits.detach().clone().requires_grad_(True)
    loss = DistCrossEntropy.apply(one, torch.tensor([0, 2, 3, 11, 5, 2]), HeadComm(0, 1))
    loss.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-12)
    torch.testing.assert_close(one.grad, logits.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("v", LOCAL, ids=[v.name for v in LOCAL])
def test_two_sharded_ranks_equal_one_process_with_a_local_store(two_ranks, v: Variant) -> None:
    ranks, snaps = two_ranks
    state, W, actives = train_local(v)
    # the CPK probe (steps 0 and 2), the score over the two ranks' rows against the store's op
    got, want = ranks[0][f"stats:{v.name}"], LAST_STATS
    assert got["cpk_step"] == want["cpk_step"] == 2.0
    for key in ("cpk_exact", "cpk_active"):
        assert abs(got[key] - want[key]) < 1e-5 and got[key] == ranks[1][f"stats:{v.name}"][key], (v.name, key)
    s0, a0 = ranks[0][v.name]
    s1, a1 = ranks[1][v.name]
    for a, b, c in zip(actives, a0, a1):
        np.testing.assert_array_equal(a, b, err_msg=f"{v.name}: active sets differ")
        np.testing.assert_array_equal(b, c, err_msg=f"{v.name}: the ranks' active sets differ")
    if v.adaptive:        # M chosen by the probe, the same as the store path's (the sets above)
        assert all(10 <= len(a) <= 30 for a in actives) and len(actives[0]) != M, [len(a) for a in actives]
    else:
        assert all(len(a) == (K if v.head == "full" else M) for a in actives)
    man = read_manifest(snaps[v.name])
    assert man["step"] == STEPS and man["num_classes"] == K
    W2 = np.load(os.path.join(snaps[v.name], man["files"]["W"]))
    # float32 rounding relative to the matrix's scale (margin heads' rows grow to ~100 here)
    np.testing.assert_allclose(W2, W, rtol=1e-5, atol=1e-6 * np.abs(W).max(), err_msg=v.name)
    for name, p in state.items():
        torch.testing.assert_close(s0[name], p, rtol=1e-5, atol=1e-5, msg=f"{v.name}: {name}")
        torch.testing.assert_close(s1[name], s0[name], rtol=0, atol=0, msg=f"{v.name}: DDP ranks differ in {name}")
    W0 = ShardedRows(K, D, _stub(0, 1), torch.device("cpu"), SGDConfig(), seed=5).W.numpy()
    assert np.abs(W2 - W0).max() > 1e-4, f"{v.name}: W did not train"


def test_the_ranks_graph_is_the_servers_goes_live_at_its_step_and_two_ranks_equal_one(two_ranks, tmp_path) -> None:
    from paramserver.index.graph import GraphIndex

    ranks, snaps = two_ranks
    v = next(v for v in VARIANTS if v.index == "graph")
    s0, a0 = ranks[0][v.name]
    s1, a1 = ranks[1][v.name]
    (p0, live0, builds0), (p1, live1, builds1) = a0.pop(), a1.pop()
    # T = 2, 4 steps: built from the rows of step 0, live from step 2 (the step-2 build never went live)
    assert (live0, builds0) == (live1, builds1) == (2, 1)
    g = np.concatenate([p0, p1])                                     # each rank holds its classes' rows
    assert g.shape == (K, 4) and (g >= 0).all() and (g != np.arange(K)[:, None]).all()
    W0 = ShardedRows(K, D, _stub(0, 1), torch.device("cpu"), SGDConfig(), seed=5).W.numpy()
    ref = GraphIndex(D, "angular", seed=5, degree=4, nlist=4, cold_nprobe=0)
    ref.build(W0)                  # the server's build on the same rows: the same lists, float16 ties aside
    overlap = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(g.tolist(), ref.neighbours.tolist())])
    assert overlap > 0.9, overlap
    # steps 2 and 3 select from the graph: every label's active neighbours rank right after the labels
    for step in (2, 3):
        labels = global_batch(step)[1].numpy()
        act = a0[step]
        nb = set(g[labels].reshape(-1).tolist()) - set(labels.tolist())
        after = act[len(set(labels.tolist())):]
        assert set(after[: min(len(nb), M - len(set(labels.tolist())))].tolist()) <= nb, step
    # one process with the global batch: the same graph, the same run
    state, actives = train_sharded(v, 0, 1, str(tmp_path / "one"))
    np.testing.assert_array_equal(actives.pop()[0], g)
    for a, b in zip(actives, a0):
        np.testing.assert_array_equal(a, b)
    W1 = np.load(tmp_path / "one" / read_manifest(str(tmp_path / "one"))["files"]["W"])
    W2 = np.load(os.path.join(snaps[v.name], read_manifest(snaps[v.name])["files"]["W"]))
    np.testing.assert_allclose(W2, W1, rtol=1e-5, atol=1e-6 * np.abs(W1).max())
    for name, p in state.items():
        torch.testing.assert_close(s0[name], p, rtol=1e-5, atol=1e-5, msg=name)


def test_ring_neighbours_are_the_top_cosines_within_the_probed_lists() -> None:
    """One rank: the ring's search equals a brute force over the members of each row's probed lists."""
    from paramserver.index.base import _normalize_rows
    from paramserver.index.graph import _nearest_lists
    from hfsoftmax.heads.sharded import ring_neighbours

    rng = np.random.default_rng(0)
    W = rng.standard_normal((300, 8)).astype(np.float32)
    C = _normalize_rows(rng.standard_normal((6, 8)).astype(np.float32))
    g = ring_neighbours(W, 0, 300, C, probe=2, degree=5)
    top, _ = _nearest_lists(W, C, 2)
    U = _normalize_rows(W)
    for i in range(300):
        cand = np.flatnonzero(np.isin(top[:, 0], top[i]) & (np.arange(300) != i))
        want = cand[np.argsort(-(U[cand] @ U[i]), kind="stable")[:5]]
        np.testing.assert_array_equal(g[i], want, err_msg=str(i))


def _stub(rank: int, world: int) -> types.SimpleNamespace:
    """A rank's view for restoring rows without a process group (each rank reads its own range)."""
    return types.SimpleNamespace(rank=rank, world_size=world, distributed=False)


def test_a_sharded_snapshot_restores_in_a_local_store_and_on_1_and_3_ranks(two_ranks) -> None:
    _, snaps = two_ranks
    path = snaps["exact_plain_lazy"]                          # lazy: W and momentum
    man = read_manifest(path)
    assert set(man["files"]) == {"W", "momentum"} and man["crc32"]
    cfg = config(Variant("x", momentum_rule="lazy"), "local")
    store = open_store(store_spec(cfg, K), restore=path)
    W = store.pull(np.arange(K))
    mom = store.pull(np.arange(K), matrix="momentum")
    assert store.step == STEPS
    store.close()
    opt = SGDConfig(sparse_momentum="lazy")
    for R in (1, 3):
        parts = []
        for r in range(R):
            rows = ShardedRows(K, D, _stub(r, R), torch.device("cpu"), opt, seed=5)
            rows.restore(path)
            assert (rows.lo, rows.hi) == shard_range(K, R, r) and rows.step == STEPS
            parts.append((rows.W.numpy(), rows.M.numpy()))
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), W)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), mom)


def test_a_store_snapshot_restores_sharded(tmp_path) -> None:
    cfg = config(Variant("x", momentum_rule="lazy"), "local")
    store = open_store(store_spec(cfg, K))
    rng = np.random.default_rng(0)
    for step in range(3):
        ids = rng.choice(K, 10, replace=False)
        store.push(ids, rng.standard_normal((10, D)).astype(np.float32), step, 0.1)
    store.snapshot(str(tmp_path / "snap"))
    W, mom = store.pull(np.arange(K)), store.pull(np.arange(K), matrix="momentum")
    store.close()
    assert np.abs(mom).max() > 0
    parts = []
    for r in range(2):
        rows = ShardedRows(K, D, _stub(r, 2), torch.device("cpu"), SGDConfig(sparse_momentum="lazy"), seed=5)
        rows.restore(str(tmp_path / "snap"))
        parts.append((rows.W.numpy(), rows.M.numpy(), rows.step))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), W)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), mom)
    assert parts[0][2] == parts[1][2] == 3
    # a corrupt file is refused before a row is replaced
    f = tmp_path / "snap" / read_manifest(str(tmp_path / "snap"))["files"]["W"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    rows = ShardedRows(K, D, _stub(0, 2), torch.device("cpu"), SGDConfig(sparse_momentum="lazy"), seed=5)
    before = rows.W.clone()
    with pytest.raises(Exception, match="checksum"):
        rows.restore(str(tmp_path / "snap"))
    torch.testing.assert_close(rows.W, before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- #
# Through hfsoftmax.train: checkpoints, resume on another number of ranks and in another store.

TINY = ["data.num_classes=41", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
        "data.val_pairs=20", "data.val_samples=0", "model.feature_dim=16", "model.norm=group",
        "train.progress=false", "train.log_every=1", "optim.lr=0.05", "optim.warmup_steps=2",
        "head.name=hf", "head.index=exact", "head.num_active=12", "head.candidates=4", "head.margin=cosface",
        "head.scale=8", "head.margin_m=0.2", "train.deterministic=true"]


def _train_rank(rank: int, world: int, port: int, overrides: list[str]) -> None:
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(load_config(None, overrides))


def _run(out, *overrides: str) -> None:
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train

    train(load_config(None, TINY + [f"train.out_dir={out}", *overrides]))


def _final(out) -> tuple[dict, np.ndarray]:
    ck = torch.load(out / "ckpt_last.pt", map_location="cpu", weights_only=False)
    snap = out / ck["store_snapshot"]
    W = np.load(snap / read_manifest(str(snap))["files"]["W"])
    return ck["model"], W


def test_sharded_training_resumes_exactly_on_other_ranks_and_in_a_local_store(tmp_path) -> None:
    two = tmp_path / "two"
    mp.spawn(_train_rank, args=(2, free_port(), TINY + [
        "store.kind=sharded", "train.batch_size=4", "train.steps=6", "train.ckpt_every=3", "train.keep_every=3",
        f"train.out_dir={two}"]), nprocs=2, join=True)
    m2, W2 = _final(two)
    assert read_manifest(str(two / "store_00000006"))["step"] == 6
    # one process, the same global batch, from the 2-rank step-3 checkpoint: sharded, then a local store
    for kind in ("sharded", "local"):
        _run(tmp_path / kind, f"store.kind={kind}", "train.batch_size=8", "train.steps=6",
             f"train.resume={two / 'ckpt_00000003.pt'}")
        m1, W1 = _final(tmp_path / kind)
        np.testing.assert_allclose(W1, W2, rtol=1e-5, atol=1e-6 * np.abs(W2).max(), err_msg=kind)
        for k in m2:
            torch.testing.assert_close(m1[k], m2[k], rtol=1e-4, atol=1e-5, msg=f"{kind}: {k}")
    # ...and one process, 6 steps straight, equals 3 + a resumed 3, bitwise
    _run(tmp_path / "a", "store.kind=sharded", "train.batch_size=8", "train.steps=6", "train.ckpt_every=3",
         "train.keep_every=3")
    _run(tmp_path / "b", "store.kind=sharded", "train.batch_size=8", "train.steps=6",
         f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}")
    (ma, Wa), (mb, Wb) = _final(tmp_path / "a"), _final(tmp_path / "b")
    np.testing.assert_array_equal(Wa, Wb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    snap3 = tmp_path / "a" / "store_00000003"
    W3 = np.load(snap3 / read_manifest(str(snap3))["files"]["W"])
    assert np.abs(W3 - Wa).max() > 1e-4                       # the last 3 steps moved W (not vacuous)


def test_store_kind_auto_picks_the_home_of_w_and_says_why() -> None:
    from hfsoftmax.heads.sharded import choose_store_kind

    GiB = 2**30
    # 1M x 256 fp32 = 1 GiB; over 8 ranks of 80 GiB GPUs: sharded
    kind, why = choose_store_kind("", "cuda", 80 * GiB, 1_000_000, 256, False, 8)
    assert kind == "sharded" and "GiB per rank" in why
    # 100M x 512 with a momentum buffer (400 GB) over 8 x 80 GiB: the server
    kind, why = choose_store_kind("", "cuda", 80 * GiB, 100_000_000, 512, True, 8)
    assert kind == "remote" and "more than 40%" in why
    assert choose_store_kind("", "cuda", 80 * GiB, 100_000_000, 512, True, 1)[0] == "local"
    assert choose_store_kind("", "cpu", 0, 1000, 64, False, 2)[0] == "remote"       # CPU training
    assert choose_store_kind("", "cpu", 0, 1000, 64, False, 1)[0] == "local"
    kind, why = choose_store_kind("tcp://h:1", "cuda", 80 * GiB, 1000, 64, False, 8)  # a shared server
    assert kind == "remote" and "tcp://h:1" in why


def test_store_kind_auto_through_the_launcher_and_the_trainer(tmp_path) -> None:
    import subprocess
    import sys

    from hfsoftmax.config import load_config
    from hfsoftmax.train import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "hfsoftmax.launch", "get", "--world", "2", "store.kind",
                        "train.device=cpu", "store.kind=auto", "head.name=hf"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "remote" and "store.kind=auto: remote" in r.stderr
    res = train(load_config(None, TINY + ["store.kind=auto", "train.steps=2", "train.batch_size=8",
                                          f"train.out_dir={tmp_path}"]))
    assert res["steps"] == 2
    cfg = load_config(str(tmp_path / "config.yaml"), [])
    assert cfg.store.kind == "auto"      # the saved config is the user's; the log says what auto chose


def test_a_two_shard_server_snapshot_restores_sharded(tmp_path) -> None:
    """Two server shards (rows [0, 31) and [31, 63)) snapshot into shard-III-of-SSS directories; 3 ranks
    read their rows across the shard boundary."""
    from paramserver.snapshot import shard_dir

    cfg = config(Variant("x", momentum_rule="lazy"), "local")
    W, mom = [], []
    for i in range(2):
        spec = dataclasses.replace(store_spec(cfg, K), shard=(i, 2))
        store = open_store(spec)
        lo, hi = shard_range(K, 2, i)
        ids = np.arange(lo, hi)
        store.push(ids[:5], np.ones((5, D), dtype=np.float32), 0, 0.1)
        store.snapshot(shard_dir(str(tmp_path / "snap"), i, 2))
        W.append(store.pull(ids))
        mom.append(store.pull(ids, matrix="momentum"))
        store.close()
    W, mom = np.concatenate(W), np.concatenate(mom)
    parts = []
    for r in range(3):
        rows = ShardedRows(K, D, _stub(r, 3), torch.device("cpu"), SGDConfig(sparse_momentum="lazy"), seed=5)
        rows.restore(str(tmp_path / "snap"))
        parts.append((rows.W.numpy(), rows.M.numpy()))
        assert rows.step == 1
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), W)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), mom)


def test_sharded_hf_with_the_graph_resumes_exactly(tmp_path) -> None:
    """T = 2: graphs built at steps 0, 2, 4, live from 2 and 4. A checkpoint at step 3 holds the live
    graph and the pending build (from step 2's rows), so 3 + a resumed 3 steps equal 6, bitwise."""
    g = ["head.index=graph", "head.rebuild_every=2", "head.degree=4", "head.nlist=4", "train.batch_size=8",
         "train.steps=6", "store.kind=sharded"]
    _run(tmp_path / "a", *g, "train.ckpt_every=3", "train.keep_every=3")
    _run(tmp_path / "b", *g, f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}")
    snap3 = tmp_path / "a" / "store_00000003"
    meta = json.loads((snap3 / "graph.json").read_text())
    assert meta["live_since"] == 2 and meta["started"] == 2 and meta["pending"]
    (ma, Wa), (mb, Wb) = _final(tmp_path / "a"), _final(tmp_path / "b")
    np.testing.assert_array_equal(Wa, Wb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    # without the pending graph the resumed run selects differently from step 4 on (not vacuous)
    (snap3 / "graph_pending.npy").unlink()
    meta["pending"] = False
    (snap3 / "graph.json").write_text(json.dumps(meta))
    _run(tmp_path / "c", *g, f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}")
    _, Wc = _final(tmp_path / "c")
    assert not np.array_equal(Wa, Wc)


def test_full_softmax_in_the_sharded_home_is_torch_sgd_with_lazy_and_the_store_rule_with_unrolled() -> None:
    """The fair comparison of heads (issue 22): ``head.name=full store.kind=sharded`` trains W with the
    store's row rule. With M = K every row is touched every step, so ``lazy`` equals torch.optim.SGD on
    the dense parameter (the plain full softmax), and ``unrolled`` is the rule HF and random sampling use."""
    from hfsoftmax.heads.full import FullSoftmax
    from hfsoftmax.heads.sharded import ShardedSoftmax

    n_cls, d, B, lrs = 50, 8, 16, [0.3, 0.2, 0.1, 0.1, 0.05]
    W0 = ShardedRows(n_cls, d, _stub(0, 1), torch.device("cpu"), SGDConfig(), seed=1, init_std=0.5).W.clone()

    def run(kind: str) -> torch.Tensor:
        if kind == "torch":
            head = FullSoftmax(n_cls, d, margin="cosface", scale=8.0, margin_m=0.2)
            with torch.no_grad():
                head.weight.copy_(W0)
            opt = torch.optim.SGD(head.parameters(), lr=lrs[0], momentum=0.9, weight_decay=5e-4)
        else:
            rows = ShardedRows(n_cls, d, HeadComm(0, 1), torch.device("cpu"),
                               SGDConfig(momentum=0.9, weight_decay=5e-4, sparse_momentum=kind), seed=1)
            rows.W.copy_(W0)
            head = ShardedSoftmax(rows, n_cls, margin="cosface", scale=8.0, margin_m=0.2)
        for step, lr in enumerate(lrs):
            g = np.random.default_rng(step)
            feats = torch.from_numpy(g.standard_normal((B, d)).astype(np.float32))
            labels = torch.from_numpy(g.integers(0, n_cls, B))
            head.begin_step(step, lr)
            loss = head(feats, labels)
            if kind == "torch":
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                loss.backward()
            head.end_step(step)
        return (head.weight if kind == "torch" else head.rows.W).detach()

    dense, lazy, unrolled = run("torch"), run("lazy"), run("unrolled")
    torch.testing.assert_close(lazy, dense, rtol=1e-5, atol=1e-6)
    assert (unrolled - dense).abs().max() > 1e-3          # the selective heads' rule is another one


def test_a_sharded_run_is_scored_from_its_snapshot_by_the_eval_tools(tmp_path) -> None:
    """python -m hfsoftmax.eval classify's head of a sharded run (full softmax too): W from the store
    snapshot, the same top-k as the sharded head's own."""
    from hfsoftmax.eval.classify import open_head
    from hfsoftmax.heads.sharded import ShardedSoftmax

    _run(tmp_path, "store.kind=sharded", "head.name=full", "train.batch_size=8", "train.steps=3")
    ck = torch.load(tmp_path / "ckpt_last.pt", map_location="cpu", weights_only=False)
    head = open_head(ck, str(tmp_path / "ckpt_last.pt"))
    rows = ShardedRows(41, D, _stub(0, 1), torch.device("cpu"), SGDConfig(), seed=0)
    rows.restore(str(tmp_path / ck["store_snapshot"]))
    own = ShardedSoftmax(rows, 41, margin="cosface", scale=8.0, margin_m=0.2)
    feats = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    v1, i1 = head.topk(feats, 5)
    v2, i2 = own.topk(feats, 5)
    torch.testing.assert_close(i1, i2, rtol=0, atol=0)
    torch.testing.assert_close(v1.float(), v2, rtol=1e-5, atol=1e-5)
    head.close()


def test_a_non_finite_gradient_leaves_the_rows_and_is_counted() -> None:
    """Decided on the device (no host sync per step): W and momentum stay, the step is counted and
    reported by stats(); a skipped optimizer step (fp16 scaler) leaves them too."""
    from hfsoftmax.heads.sharded import ShardedSoftmax

    rows = ShardedRows(20, 4, HeadComm(0, 1), torch.device("cpu"), SGDConfig(sparse_momentum="lazy"), seed=0)
    head = ShardedSoftmax(rows, 20)
    W0, M0 = rows.W.clone(), rows.M.clone()
    feats = torch.full((3, 4), float("inf"), requires_grad=True)
    head.begin_step(0, 0.1)
    head(feats, torch.tensor([1, 2, 3])).backward()
    head.end_step(0)
    assert torch.equal(rows.W, W0) and torch.equal(rows.M, M0)
    assert head.stats()["nonfinite_skipped_steps"] == 1
    head.begin_step(1, 0.1)
    head(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 2, 3])).backward()
    head.end_step(1, applied=False)
    assert torch.equal(rows.W, W0)
    head.begin_step(2, 0.1)
    head(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 2, 3])).backward()
    head.end_step(2)
    assert not torch.equal(rows.W, W0) and rows.step == 3


def test_two_sharded_ranks_score_top_k_over_all_k_together(tmp_path) -> None:
    """With W split across the ranks every rank joins the top-k over all K (each scores its rows):
    the run reports it, and it equals the same checkpoint scored from its snapshot in one process."""
    from hfsoftmax.config import load_config
    from hfsoftmax.data.synthetic import heldout_samples, spec_from_config
    from hfsoftmax.eval.classify import open_head
    from hfsoftmax.backbones import get_backbone
    from hfsoftmax.train import identify

    out = tmp_path / "two"
    over = TINY + ["store.kind=sharded", "data.val_samples=24", "train.batch_size=4", "train.steps=3",
                   f"train.out_dir={out}"]
    mp.spawn(_train_rank, args=(2, free_port(), over), nprocs=2, join=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if r.get("event") == "eval" and "heldout_top1" in r]
    assert final, "no top-k over all K in the 2-rank run"
    ck = torch.load(out / "ckpt_last.pt", map_location="cpu", weights_only=False)
    cfg = load_config(None, over)
    backbone = get_backbone("tiny", D, 16, norm="group")
    backbone.load_state_dict(ck["model"])
    head = open_head(ck, str(out / "ckpt_last.pt"))
    images, labels = heldout_samples(spec_from_config(cfg.data), 24)
    r = identify(backbone, head, images, labels, torch.device("cpu"))
    head.close()
    assert r["top1"] == final[-1]["heldout_top1"] and r["top5"] == final[-1]["heldout_top5"]


def test_the_cpk_probe_of_the_sharded_head_equals_the_store_paths() -> None:
    """cpk_exact and cpk_active of a sharded head (its own score op over the rows) equal those of the
    selective head on a local store with the same W, features and active set, exact and sampled."""
    from hfsoftmax.heads.sharded import ShardedSoftmax

    n_cls, d, B, Mx = 60, 8, 16, 24
    for sample in (200_000, 30):                  # exact over all K; sampled around the active set
        cfg = config(Variant("x", head="random", index="random"), "local")
        cfg.head.cpk_every, cfg.head.cpk_sample, cfg.model.feature_dim = 1, sample, d
        store = make_store(cfg, n_cls, DistInfo(0, 1, 0, torch.device("cpu")))
        sel = SelectiveSoftmax.from_config(cfg.head, store, n_cls, d, seed=5)
        sel.num_active = Mx
        rows = ShardedRows(n_cls, d, HeadComm(0, 1), torch.device("cpu"), SGDConfig(), seed=5)
        rows.W.copy_(torch.from_numpy(store.pull(np.arange(n_cls))))
        sh = ShardedSoftmax(rows, Mx, margin="cosface", scale=8.0, margin_m=0.2, seed=5, cpk_every=1,
                            cpk_sample=sample)
        g = np.random.default_rng(2)
        feats = torch.from_numpy(g.standard_normal((B, d)).astype(np.float32))
        labels = torch.from_numpy(g.integers(0, n_cls, B))
        for head in (sel, sh):
            head.begin_step(0, 0.0)
            head(feats.clone().requires_grad_(True), labels)
        a, b = sel.stats(), sh.stats()
        for key in ("cpk_exact", "cpk_active"):
            assert 0 < b[key] <= 1 and abs(a[key] - b[key]) < 1e-6, (sample, key, a[key], b[key])
        np.testing.assert_array_equal(sel.last_active, sh.last_active)
        sel.close()


def test_the_adaptive_rule_moves_the_sharded_graphs_rebuild_period(monkeypatch) -> None:
    """With head.adaptive the T rule (AdaptiveAllocation.observe, the server path's) sets the graph's
    period at probe steps: T = 2 -> 3 at step 0 puts the swaps at steps 3 and 6 (not 2, 4, 6)."""
    from hfsoftmax.heads.cpk import AdaptiveAllocation
    from hfsoftmax.heads.sharded import ShardedSoftmax

    monkeypatch.setattr(AdaptiveAllocation, "observe", lambda self, cpk_active, builds, period: 3)
    rows = ShardedRows(40, 8, HeadComm(0, 1), torch.device("cpu"), SGDConfig(), seed=0)
    head = ShardedSoftmax(rows, 12, margin="cosface", scale=8.0, margin_m=0.2, index="graph", degree=4, nlist=4,
                          rebuild_every=2, cpk_every=1, adapt=AdaptiveAllocation(0.5, 10, 30, 2))
    for step in range(7):
        g = np.random.default_rng(step)
        head.begin_step(step, 0.1)
        head(torch.from_numpy(g.standard_normal((8, 8)).astype(np.float32)).requires_grad_(True),
             torch.from_numpy(g.integers(0, 40, 8))).backward()
        head.end_step(step)
    assert head.graph.every == 3 and head.graph.builds == 2 and head.graph.live_since == 6
    assert head.get_extra_state()["rebuild_every"] == 3
    head.close()

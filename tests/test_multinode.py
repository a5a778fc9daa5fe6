"""Several nodes through the launch scripts, on loopback: two "nodes" (two invocations of
scripts/train_hf.sh with NNODES=2, NODE_RANK=0/1, one rank each, gloo) train like one node of two
ranks, with W sharded across the ranks and with a parameter server shard started on each node."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from paramserver.snapshot import read_manifest

from servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["data.num_classes=41", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
       "data.val_pairs=20", "data.val_samples=0", "model.feature_dim=16", "model.norm=group", "train.progress=false",
       "train.log_every=1", "optim.lr=0.05", "optim.warmup_steps=2", "head.name=hf", "head.index=exact",
       "head.num_active=12", "head.candidates=4", "head.rebuild_every=1000", "train.batch_size=4", "train.steps=4",
       "train.ckpt_every=4", "train.deterministic=true", "train.threads=1"]


def _launch(out, env_extra: dict, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    env.pop("HFSOFTMAX_DEBUG", None)
    return subprocess.Popen(["sh", "scripts/train_hf.sh", *RUN, f"train.out_dir={out}", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> None:
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


def _result(out) -> tuple[dict, np.ndarray]:
    ck = torch.load(out / "ckpt_last.pt", map_location="cpu", weights_only=False)
    snap = out / ck["store_snapshot"]
    if (snap / "manifest.json").exists():
        W = np.load(snap / read_manifest(str(snap))["files"]["W"])
    else:                       # a server with several shards: one snapshot per shard, in id order
        parts = sorted(p for p in snap.iterdir() if p.is_dir())
        assert len(parts) == 2, parts
        W = np.concatenate([np.load(p / read_manifest(str(p))["files"]["W"]) for p in parts])
    return ck["model"], W


def _two_nodes(out, kind: str, env: dict) -> None:
    port = free_port()
    common = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env}
    _finish(*[_launch(out, {**common, "NODE_RANK": str(r)}, f"store.kind={kind}") for r in range(2)])


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node")
    _finish(_launch(out, {"NPROC": "2"}, "store.kind=sharded"))
    return _result(out)


def _same(a, b) -> None:
    (ma, Wa), (mb, Wb) = a, b
    np.testing.assert_allclose(Wa, Wb, rtol=1e-5, atol=1e-6 * np.abs(Wb).max())
    for k in mb:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_nodes_sharded_equal_one_node_of_two_ranks(tmp_path, one_node) -> None:
    _two_nodes(tmp_path, "sharded", {})
    _same(_result(tmp_path), one_node)


def test_two_nodes_with_a_server_shard_each_equal_one_node(tmp_path, one_node) -> None:
    ps = free_port()
    _two_nodes(tmp_path, "remote", {"NODE_ADDRS": "127.0.0.1,127.0.0.1", "PARAMSERVER_TOKEN": "loopback-test",
                                    "PS_PORT": str(ps)})
    assert (tmp_path / "paramserver-0.log").exists() and (tmp_path / "paramserver-1.log").exists()
    _same(_result(tmp_path), one_node)


def test_several_nodes_without_a_master_address_is_one_line(tmp_path) -> None:
    p = _launch(tmp_path, {"NNODES": "2", "NPROC": "1"}, "store.kind=sharded")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "MASTER_ADDR" in out.strip().splitlines()[-1]

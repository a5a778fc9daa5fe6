"""Training loop: DDP (2 gloo ranks) == one process, resume == uninterrupted, schedules, learning."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hfsoftmax.config import OptimConfig, load_config
from hfsoftmax.data.sampler import EpochSampler, RunSampler
from hfsoftmax.train import lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["data.num_classes=40", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
        "data.val_pairs=20", "model.feature_dim=16", "train.progress=false", "train.log_every=1",
        "optim.lr=0.05", "optim.warmup_steps=2"]


# The bitwise promises (resume == uninterrupted, worker counts, same seed) hold on CPU as is and on
# CUDA with deterministic kernels: these tests ask for them, so they mean the same on a GPU machine.
BITWISE = ["train.deterministic=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_of(ckpt_path):
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return ck, {**{f"model.{k}": v for k, v in ck["model"].items()}, **{f"head.{k}": v for k, v in ck["head"].items()}}


def test_lr_schedules_are_pure_functions():
    c = OptimConfig(lr=1.0, schedule="step", milestones=[10, 20], gamma=0.1, warmup_steps=0)
    assert [lr_at(s, c, 30) for s in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    c = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr=0.0)
    assert [lr_at(s, c, 104) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(54, c, 104) == pytest.approx(0.5)
    assert lr_at(104, c, 104) == pytest.approx(0.0, abs=1e-12)


def test_epoch_sampler_ranks_partition_global_batch():
    one = list(EpochSampler(100, 8, 0, 1, seed=3, epoch=2))
    r0 = list(EpochSampler(100, 4, 0, 2, seed=3, epoch=2))
    r1 = list(EpochSampler(100, 4, 1, 2, seed=3, epoch=2))
    for b in range(len(one) // 8):
        assert sorted(one[8 * b:8 * b + 8]) == sorted(r0[4 * b:4 * b + 4] + r1[4 * b:4 * b + 4])
    resumed = list(EpochSampler(100, 8, 0, 1, seed=3, epoch=2, start_batch=5))
    assert resumed == one[40:]


def test_run_sampler_is_the_epoch_samplers_back_to_back_and_resumes_anywhere():
    """One loader serves the whole run: its keys are each epoch's order in turn, tagged with the epoch,
    and starting at step s (resume) gives exactly the suffix from s's first sample."""
    B, per_epoch = 4, 100 // 8     # rank 1 of 2, 4 a rank: a global batch of 8
    expect = [(e, i) for e in range(4) for i in EpochSampler(100, B, 1, 2, seed=3, epoch=e)]

    def first(n, start_step=0):
        it = iter(RunSampler(100, B, 1, 2, seed=3, start_step=start_step))
        return [next(it) for _ in range(n)]

    assert first(len(expect)) == expect
    for s in (1, per_epoch - 1, per_epoch, 2 * per_epoch + 5):
        assert first(len(expect) - s * B, s) == expect[s * B:], s


def test_resume_equals_uninterrupted(tmp_path):
    base = TINY + BITWISE + ["train.steps=6", "head.margin=cosface", "head.scale=8", "head.margin_m=0.2"]
    a = tmp_path / "a"
    train(load_config(None, base + [f"train.out_dir={a}", "train.ckpt_every=3", "train.keep_every=3"]))
    # a second run dir starting from the step-3 checkpoint of the first
    b = tmp_path / "b"
    b.mkdir()
    train(load_config(None, base + [f"train.out_dir={b}", f"train.resume={a / 'ckpt_00000003.pt'}"]))
    ck_a, pa = params_of(a / "ckpt_last.pt")
    ck_b, pb = params_of(b / "ckpt_last.pt")
    assert ck_a["step"] == ck_b["step"] == 6
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    # and the first 3 steps alone differ from 6 (the test can fail)
    _, p3 = params_of(a / "ckpt_00000003.pt")
    assert not torch.equal(p3["head.weight"], pa["head.weight"])


def test_resume_auto_continues(tmp_path):
    base = TINY + [f"train.out_dir={tmp_path}"]
    train(load_config(None, base + ["train.steps=2"]))
    r = train(load_config(None, base + ["train.steps=4", "train.resume=auto"]))
    assert r["start_step"] == 2
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=False)["step"] == 4


def _rank_main(rank, world, port, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(load_config(None, overrides))


def test_two_gloo_ranks_equal_one_process(tmp_path):
    # GroupNorm: BatchNorm statistics are per rank, so with BN DDP differs from one process by design.
    common = TINY + ["model.norm=group", "train.steps=3", "head.margin=arcface", "head.scale=8",
                     "head.margin_m=0.3", "optim.weight_decay=0.001"]
    one = tmp_path / "one"
    train(load_config(None, common + ["train.batch_size=8", f"train.out_dir={one}"]))
    two = tmp_path / "two"
    mp.spawn(_rank_main, args=(2, free_port(), common + ["train.batch_size=4", f"train.out_dir={two}"]),
             nprocs=2, join=True)
    _, p1 = params_of(one / "ckpt_last.pt")
    _, p2 = params_of(two / "ckpt_last.pt")
    _, p0 = None, None
    for k in p1:
        assert torch.allclose(p1[k].float(), p2[k].float(), rtol=1e-4, atol=1e-5), k
    # ...and training did move the weights (the comparison is not vacuous)
    assert not torch.allclose(p1["head.weight"], torch.zeros_like(p1["head.weight"]))


def test_tiny_run_improves_heldout_accuracy(tmp_path):
    r = train(load_config(None, ["data.num_classes=100", "data.samples_per_class=16", "data.image_size=16",
                                 "data.val_identities=60", "data.val_pairs=300", "model.feature_dim=32",
                                 "train.progress=false", "train.steps=40", "train.batch_size=32",
                                 "head.margin=cosface", "head.scale=16", "head.margin_m=0.1",
                                 "optim.warmup_steps=5", f"train.out_dir={tmp_path}"]))
    start = r["start_verification"]["heldout"]["accuracy"]
    end = r["verification"]["heldout"]["accuracy"]
    assert end > start + 0.1, (start, end)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"event": "train"' in l for l in lines) and any('"event": "done"' in l for l in lines)
    assert (tmp_path / "config.yaml").exists()


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("HFSOFTMAX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hfsoftmax.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_missing_dataset_path(tmp_path):
    r = _cli("data.path=/no/such/dataset", f"train.out_dir={tmp_path}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "/no/such/dataset" in r.stderr.strip().splitlines()[-1]


def test_cli_misspelled_key():
    r = _cli("train.stepz=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.stepz" in r.stderr.strip().splitlines()[-1]


def test_cli_checkpoint_for_other_k(tmp_path):
    train(load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"]))
    r = _cli(*TINY, "train.steps=2", "data.num_classes=41", f"train.resume={tmp_path / 'ckpt_last.pt'}",
             f"train.out_dir={tmp_path / 'other'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "num_classes=40" in last and "num_classes=41" in last


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash during torch.save leaves the previous checkpoint intact and no temp file behind."""
    import hfsoftmax.train as T
    train(load_config(None, TINY + ["train.steps=1", f"train.out_dir={tmp_path}"]))
    before = (tmp_path / "ckpt_last.pt").read_bytes()
    real_save = torch.save

    def boom(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")
    monkeypatch.setattr(T.torch, "save", boom)
    with pytest.raises(OSError):
        train(load_config(None, TINY + ["train.steps=2", "train.resume=auto", f"train.out_dir={tmp_path}"]))
    monkeypatch.setattr(T.torch, "save", real_save)
    assert (tmp_path / "ckpt_last.pt").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def _rec_folder(folder, K=12, per_class=6, size=16):
    from hfsoftmax.data.binset import encode_jpeg
    from hfsoftmax.data.recordio import write_insightface_rec

    rng = np.random.default_rng(0)
    items = []
    for c in range(K):
        base = rng.integers(0, 255, (size, size, 3))
        for _ in range(per_class):   # asymmetric images: a flip changes the pixels
            img = np.clip(base + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            items.append((encode_jpeg(img), c))
    write_insightface_rec(str(folder), items, image_size=size)
    return folder


@pytest.mark.parametrize("head", ["full", "random"])
def test_resume_on_a_rec_dataset_is_exact(tmp_path, head):
    """A .rec dataset (random flips), dropout, and for the random head a store at M < K: the run
    resumed from its mid-run checkpoint ends bitwise equal to the uninterrupted run."""
    data = _rec_folder(tmp_path / "data")
    base = [f"data.path={data}", "data.image_size=16", "model.feature_dim=16", "model.dropout=0.3",
            "train.progress=false", "train.batch_size=8", "train.steps=8", "train.log_every=4",
            f"head.name={head}", "head.num_active=10", "store.kind=local", "optim.lr=0.05", "data.num_workers=1",
            *BITWISE]
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_config(os.path.join(ROOT, "configs", "faces_full.yaml"), base + [
        f"train.out_dir={a}", "train.ckpt_every=3", "train.keep_every=3"]))
    b.mkdir()
    train(load_config(os.path.join(ROOT, "configs", "faces_full.yaml"), base + [
        f"train.out_dir={b}", f"train.resume={a / 'ckpt_00000003.pt'}"]))
    _, pa = params_of(a / "ckpt_last.pt")
    _, pb = params_of(b / "ckpt_last.pt")
    for k in pa:
        assert torch.equal(pa[k], pb[k]) if torch.is_tensor(pa[k]) else pa[k] == pb[k], k
    if head == "random":
        from paramserver.store import WeightStore
        wa = WeightStore.from_snapshot(str(a / "store_00000008")).pull(np.arange(12))
        wb = WeightStore.from_snapshot(str(b / "store_00000008")).pull(np.arange(12))
        np.testing.assert_array_equal(wa, wb)


def test_loader_workers_change_nothing_across_epochs(tmp_path):
    """0 workers (float images decoded in the loop) and 2 workers (uint8 images normalised after the
    loader; one loader for the whole run) train bitwise alike over three epochs with random flips."""
    data = _rec_folder(tmp_path / "data", K=4, per_class=4)       # 16 images: 2 batches an epoch
    base = [f"data.path={data}", "data.image_size=16", "model.feature_dim=8", "train.progress=false",
            "train.batch_size=8", "train.steps=6", "train.log_every=3", "store.kind=local", *BITWISE]
    runs = {}
    for w in (0, 2):
        out = tmp_path / f"w{w}"
        train(load_config(os.path.join(ROOT, "configs", "faces_full.yaml"), base + [
            f"train.out_dir={out}", f"data.num_workers={w}", "data.prefetch_factor=1"]))
        runs[w] = params_of(out / "ckpt_last.pt")[1]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]) if torch.is_tensor(runs[0][k]) else runs[0][k] == runs[2][k], k


@pytest.mark.parametrize("head", ["full", "hf"])
def test_identification_top1_is_the_nearest_class_row(tmp_path, head):
    """data.val_samples: top-1 / top-5 over all K of new images of training identities, as logged,
    equal a direct nearest-row search over the trained classifier (the store's rows for HF)."""
    from hfsoftmax.backbones import get_backbone
    from hfsoftmax.data.synthetic import heldout_samples, spec_from_config
    from hfsoftmax.eval.extract import extract_features

    out = tmp_path / head
    cfg = load_config(None, TINY + ["train.steps=60", "data.val_samples=60", f"head.name={head}", "head.margin=cosface",
                                    "head.num_active=16", "store.kind=local", f"train.out_dir={out}"])
    result = train(cfg)
    ck = torch.load(out / "ckpt_last.pt", weights_only=False)
    net = get_backbone("tiny", cfg.model.feature_dim, cfg.data.image_size, width=cfg.model.width)
    net.load_state_dict(ck["model"])
    images, labels = heldout_samples(spec_from_config(cfg.data), 60)
    f = extract_features(net, images, flip=True, progress=False)
    if head == "full":
        W = ck["head"]["weight"].numpy()
    else:
        from paramserver.store import WeightStore
        W = WeightStore.from_snapshot(str(out / ck["store_snapshot"])).pull(np.arange(result["num_classes"]))
    sims = f @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    top5 = np.argsort(-sims, axis=1)[:, :5]
    ident = result["identification"]
    assert ident["top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
    assert ident["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
    assert 0 < ident["top1"] < 1 and ident["top1"] <= ident["top5"]   # a trained net, and not a trivial answer
    ev = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln][-1]
    assert ev["heldout_top1"] == ident["top1"]


def test_same_seed_hf_runs_are_equal_through_background_rebuilds(tmp_path):
    """HF with the forest index rebuilt in the background every 2 steps: two runs of the same
    command end bitwise equal (each new index goes live at a step fixed in advance)."""
    from paramserver.store import WeightStore
    base = TINY + BITWISE + ["head.name=hf", "head.index=forest", "head.num_active=12", "head.candidates=6",
                   "head.rebuild_every=2", "store.kind=local", "train.steps=12", "train.batch_size=8"]
    for run in ("a", "b"):
        train(load_config(None, base + [f"train.out_dir={tmp_path / run}"]))
    _, pa = params_of(tmp_path / "a" / "ckpt_last.pt")
    _, pb = params_of(tmp_path / "b" / "ckpt_last.pt")
    for k in pa:
        assert torch.equal(pa[k], pb[k]) if torch.is_tensor(pa[k]) else pa[k] == pb[k], k
    wa = WeightStore.from_snapshot(str(tmp_path / "a" / "store_00000012")).pull(np.arange(40))
    wb = WeightStore.from_snapshot(str(tmp_path / "b" / "store_00000012")).pull(np.arange(40))
    np.testing.assert_array_equal(wa, wb)
    builds = [json.loads(x).get("index_builds") for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert max(b for b in builds if b is not None) >= 4

"""The benchmarks' core functions at tiny sizes, so the benchmark code cannot rot (seconds in all)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_accuracy  # noqa: E402
import bench_head  # noqa: E402
import common  # noqa: E402


def test_cpk_exact_matches_dense_softmax():
    rng = np.random.default_rng(0)
    K, d, P, M = 300, 16, 5, 20
    W = rng.standard_normal((K, d)).astype(np.float32)
    F = rng.standard_normal((P, d)).astype(np.float32)
    labels = rng.integers(0, K, P)
    active = np.unique(np.concatenate([labels, rng.choice(K, M, replace=False)]))
    out = common.cpk_exact(lambda lo, hi: W[lo:hi], K, F, active, M, scale=10.0, block=64, labels=labels)
    Fn = F / np.linalg.norm(F, axis=1, keepdims=True)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    s = 10.0 * Fn.astype(np.float64) @ Wn.T.astype(np.float64)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert out["cpk"] == pytest.approx(p[:, active].sum(1).mean(), rel=1e-6)
    assert out["cpk_topM"] == pytest.approx(np.sort(p, 1)[:, -M:].sum(1).mean(), rel=1e-6)
    p_lab = p[np.arange(P), labels]
    neg = ((p[:, active].sum(1) - p_lab) / (1 - p_lab)).mean()
    assert out["neg_cpk"] == pytest.approx(neg, rel=1e-6)


def test_family_rows_families_share_a_centre():
    a = common.family_rows(0, 40, 8, family_size=10, spread=0.0, seed=3)
    assert np.allclose(a, common.family_rows(0, 40, 8, family_size=10, spread=0.0, seed=3))
    assert np.allclose(a[0], a[9]) and not np.allclose(a[9], a[10])    # spread 0: a family is one row
    b = common.family_rows(0, 40, 8, family_size=10, spread=1.0, seed=3)
    assert not np.allclose(b[0], b[1])


HEAD_SPEC = {"K": 1000, "d": 128, "B": 16, "M": 100, "candidates": 8, "nprobe": 0, "nlist": 0, "steps": 2, "warmup": 1}


def test_bench_head_full_and_siblings():
    r = bench_head.worker_full(dict(HEAD_SPEC, method="full"))
    assert r["ms"] > 0 and r["peak_rss_mib"] > 0
    for m in ("mach", "rp"):
        r = bench_head.worker_sibling(dict(HEAD_SPEC, method=m))
        assert r["ms"] > 0 and r["param_mib"] > 0


@pytest.mark.parametrize("index", ["ivf", "graph", "random"])
def test_bench_head_hf_step_and_rebuild_phases(index):
    spec = dict(HEAD_SPEC, method="hf-" + index if index != "random" else "random", index=index)
    if index != "random":
        spec.update(rebuild_phase_s=0.3, rebuild_every=2)
    r = bench_head.worker_hf(spec)
    assert r["ms"] > 0
    assert 0.0 < r["cpk"] <= 1.0 + 1e-9
    if index != "random":
        assert r["ms_random_paired"] > 0
        assert "rebuild_cost" in r and r["bg_builds_done"] >= 0


def test_bench_accuracy_train_eval_tiny():
    spec = {"families": 10, "family_size": 20, "d": 16, "batch": 32, "steps": 4, "m": 64, "candidates": 4,
            "rebuild_every": 2, "lr": 0.1, "weight_decay": 5e-4, "scale": 30.0, "margin_m": 0.2, "rp_m": 8,
            "eval_samples": 100, "pairs": 100, "seed": 0, "sparse_momentum": "unrolled"}
    for method in ("full", "hf-ivf", "hf-graph", "random", "mach", "rp"):
        r = bench_accuracy.train_eval(dict(spec, method=method))
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["verif"] <= 1.0, method
        assert r["ms_per_step"] > 0 and r["classifier_mib"] > 0
        if method in ("hf-ivf", "hf-graph", "random"):
            assert 0.0 < r["cpk"] <= 1.0 + 1e-9


def test_identity_task_pairs_balanced():
    task = bench_accuracy.IdentityTask(5, 10, seed=1)
    x, issame = task.verification_pairs(40, seed=1)
    assert x.shape == (80, task.D) and issame.sum() == 20


def test_bench_multirank_tiny(capsys):
    """R = 1 and 2 gloo ranks against a server: the same rows move per step whatever R is."""
    import bench_multirank  # noqa: E402

    assert bench_multirank.main(["--num-classes", "5000", "--dim", "16", "--batch", "8", "--ranks", "1,2",
                                 "--actives", "200", "--steps", "2", "--warmup", "1", "--e2e-steps", "0"]) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert float(result["rows_r1"]) == float(result["rows_r2"]) == 400.0    # M pulled + M pushed
    assert float(result["server_ms_r2"]) > 0 and "server_ratio_r2_r1" in result


def test_bench_accuracy_sweep_m_writes_the_figures(tmp_path, capsys):
    out = tmp_path / "acc.png"
    assert bench_accuracy.main(["--families", "10", "--family-size", "20", "--d", "16", "--batch", "32", "--steps", "3",
                                "--eval-samples", "100", "--pairs", "100", "--sweep-m", "0.2,0.5",
                                "--sweep-out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and "hf_graph_top1_at_20pct=" in last and "random_top1_at_50pct=" in last
    assert (tmp_path / "acc_top1.png").stat().st_size > 1000 and (tmp_path / "acc_verif.png").exists()

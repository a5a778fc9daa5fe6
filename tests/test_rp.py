"""Random-projection softmax and dual-random-projection recovery, against a float64 reference:
L2-regularised softmax regression solved to convergence (Newton) in the full d dimensions."""
from __future__ import annotations

import io
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.config import Config
from hfsoftmax.heads import FullSoftmax, build_head
from hfsoftmax.heads.mach import MachHead
from hfsoftmax.heads.rp import RPSoftmax, recover_classifier

LAM = 5e-2


def objective(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """(1/n) sum_i CE(W x_i, y_i) + (lam/2) ||W||^2."""
    return F.cross_entropy(x @ W.t(), y) + 0.5 * lam * (W * W).sum()


def solve_l2_softmax(x: torch.Tensor, y: torch.Tensor, K: int, lam: float, tol: float = 1e-11) -> torch.Tensor:
    """Newton's method with backtracking on the strongly convex objective above (float64): [K, d]."""
    n, d = x.shape
    W = torch.zeros(K, d, dtype=torch.float64)
    Y = F.one_hot(y, K).double()
    xx = (x[:, :, None] * x[:, None, :]).reshape(n, d * d)                     # [n, d*d]
    eye = torch.eye(K * d, dtype=torch.float64)
    for _ in range(50):
        p = (x @ W.t()).softmax(1)                                              # [n, K]
        g = (p - Y).t() @ x / n + lam * W                                       # [K, d]
        if g.norm() < tol:
            return W
        s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]                 # [n, K, K] softmax Jacobian
        H = (s.reshape(n, K * K).t() @ xx / n).reshape(K, K, d, d).permute(0, 2, 1, 3).reshape(K * d, K * d)
        step = torch.linalg.solve(H + lam * eye, g.reshape(-1)).reshape(K, d)
        t, f0 = 1.0, objective(W, x, y, lam)
        while objective(W - t * step, x, y, lam) > f0 - 0.25 * t * (g * step).sum() and t > 1e-8:
            t *= 0.5
        W = W - t * step
    raise AssertionError(f"Newton did not converge: |grad| = {float(g.norm())}")


def low_rank_problem(K: int = 10, d: int = 96, n: int = 300, r: int = 6, noise: float = 0.1, seed: int = 0):
    """Features near an r-dim subspace of R^d (the regime where dual random projection is accurate)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]          # [d, r]
    centres = 2.0 * torch.randn(K, r, generator=g, dtype=torch.float64)
    y = torch.arange(n) % K
    x = (centres[y] + torch.randn(n, r, generator=g, dtype=torch.float64)) @ U.t()
    x = x + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def accuracy(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ W.t()).argmax(1) == y).double().mean())


def test_recovery_formula_is_exact_at_the_full_optimum():
    # At the optimum of the full problem, W* = -(1/(lam n)) sum_i (p*_i - y_i) x_i^T exactly (stationarity).
    x, y = low_rank_problem()
    K, d = 10, x.shape[1]
    w_star = solve_l2_softmax(x, y, K, LAM)
    head = FullSoftmax(K, d).double()
    with torch.no_grad():
        head.weight.copy_(w_star)
    # Uneven batches and class blocks that do not divide K exercise the blockwise accumulation.
    w_rec = recover_classifier(head, batches(x, y, 77), LAM, class_block=3)
    torch.testing.assert_close(w_rec, w_star, rtol=1e-8, atol=1e-9)
    # n given explicitly scales the same way.
    torch.testing.assert_close(recover_classifier(head, batches(x, y, 300), LAM, num_samples=600), w_star / 2,
                               rtol=1e-8, atol=1e-9)


def test_recovered_classifier_approaches_the_reference_as_m_grows():
    x, y = low_rank_problem()
    K, d, r = 10, x.shape[1], 6
    w_star = solve_l2_softmax(x, y, K, LAM)
    acc_ref = accuracy(w_star, x, y)
    ms = (6, 24, 80)
    errs, accs, naive = [], [], []
    for m in ms:
        e, a, nv = [], [], []
        for seed in range(3):                                                   # average over draws of P
            head = RPSoftmax(K, d, m, seed=seed).double()
            w_slim = solve_l2_softmax(x @ head.proj, y, K, LAM)                 # the slim model, trained to optimum
            with torch.no_grad():
                head.weight.copy_(w_slim)
            w_hat = recover_classifier(head, batches(x, y, 64), LAM, class_block=4)
            e.append(float((w_hat - w_star).norm() / w_star.norm()))
            a.append(accuracy(w_hat, x, y))
            nv.append(float((w_slim @ head.proj.t() - w_star).norm() / w_star.norm()))
        errs.append(sum(e) / 3)
        accs.append(sum(a) / 3)
        naive.append(sum(nv) / 3)
    # Monotone in m.
    assert errs[0] > errs[1] > errs[2], errs
    # Zhang et al. (COLT 2013), Thm 1: for rank-r data, ||W_hat - W*|| <= eps / (1 - eps) ||W*|| with
    # eps of order sqrt(r / m). With unit constant, r = 6, m = 80: eps = 0.274, bound 0.377. (Measured: 1.58, 0.45, 0.19.)
    eps = math.sqrt(r / ms[-1])
    assert errs[-1] < eps / (1 - eps), errs
    # Accuracy approaches the reference's (measured: 0.68, 0.78, 0.90 vs 0.90).
    assert abs(accs[-1] - acc_ref) <= 0.02 and abs(accs[-1] - acc_ref) < abs(accs[0] - acc_ref), (accs, acc_ref)
    # The dual recovery beats lifting the slim weights back (W_slim P^T) at every m (measured 3.6, 2.0, 1.07).
    assert all(e < nv for e, nv in zip(errs, naive)), (errs, naive)


def test_rp_head_logits_projection_and_checkpoint():
    torch.manual_seed(0)
    K, d, m = 13, 20, 5
    head = RPSoftmax(K, d, m, seed=7)
    x, y = torch.randn(4, d), torch.randint(0, K, (4,))
    logits = (x @ head.proj) @ head.weight.t()
    torch.testing.assert_close(head.scores(x), logits)
    torch.testing.assert_close(head(x, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(head.scores_block(x, 3, 9), logits[:, 3:9])
    assert head.proj.shape == (d, m) and head.param_ratio() == m / d
    assert torch.equal(RPSoftmax(K, d, m, seed=7).proj, head.proj)
    assert not torch.equal(RPSoftmax(K, d, m, seed=8).proj, head.proj)
    # P is not trained, but it is saved: a checkpoint restores it.
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    other = RPSoftmax(K, d, m, seed=99)
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(other.scores(x), head.scores(x))
    # Entries N(0, 1/m): E[P P^T] = I, checked loosely on a big draw.
    big = RPSoftmax(2, 400, 200, seed=1).proj
    assert abs(float(big.pow(2).sum(1).mean()) - 1.0) < 0.02


def test_config_builds_rp_and_bad_input_is_refused():
    cfg = Config()
    cfg.head.name = "rp"
    cfg.head.rp.proj_dim = 16
    head = build_head(cfg.head, 50, 64)
    assert isinstance(head, RPSoftmax) and head.proj_dim == 16
    cfg.head.rp.proj_dim = 64
    with pytest.raises(ValueError, match="proj_dim m = 64 must satisfy 0 < m < model.feature_dim d = 64"):
        build_head(cfg.head, 50, 64)
    with pytest.raises(ValueError, match="proj_dim m = 70 must satisfy 0 < m < d = 64"):
        RPSoftmax(50, 64, 70)
    x, y = torch.randn(3, 8), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="got MachHead"):
        recover_classifier(MachHead(100, 8, 2, 10), [(x, y)], LAM)
    with pytest.raises(ValueError, match="margin 'arcface'"):
        recover_classifier(RPSoftmax(10, 8, 4, margin="arcface"), [(x, y)], LAM)
    head = RPSoftmax(10, 8, 4)
    with pytest.raises(ValueError, match="weight_decay .* must be > 0, got 0"):
        recover_classifier(head, [(x, y)], 0.0)
    with pytest.raises(ValueError, match="yielded no samples"):
        recover_classifier(head, [], LAM)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got min 0, max 10"):
        recover_classifier(head, [(x, torch.tensor([0, 1, 10]))], LAM)
    with pytest.raises(ValueError, match=r"features must be \[B, 8\]"):
        recover_classifier(head, [(torch.randn(3, 9), y)], LAM)


# --------------------------------------------------------------------------------------------- #
# tools/rp_recover.py: a checkpoint in the layout hfsoftmax.train writes.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import rp_recover  # noqa: E402


def _write_checkpoint(path: str, head_name: str, K: int = 6, d: int = 16, m: int = 4) -> tuple:
    from hfsoftmax.backbones import get_backbone

    cfg = Config()
    cfg.head.name = head_name
    cfg.head.rp.proj_dim = m
    cfg.model.backbone, cfg.model.feature_dim = "tiny", d
    cfg.data.image_size, cfg.data.num_classes, cfg.data.samples_per_class = 16, K, 3
    torch.manual_seed(0)
    backbone = get_backbone("tiny", d, 16)
    head = build_head(cfg.head, K, d)
    torch.save({"step": 1, "num_classes": K, "config": cfg.to_dict(), "model": backbone.state_dict(),
                "head": head.state_dict()}, path)
    return backbone.eval(), head


def test_rp_recover_tool_matches_the_function(tmp_path):
    ckpt = str(tmp_path / "ckpt_last.pt")
    backbone, head = _write_checkpoint(ckpt, "rp")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 6, (5,), generator=g)) for _ in range(3)]
    out = str(tmp_path / "W.npy")
    w_tool = rp_recover.recover_from_checkpoint(ckpt, out, batches=2, images_labels=data, class_block=4)
    with torch.no_grad():
        feats = [(backbone(im), lab) for im, lab in data[:2]]
    w_ref = recover_classifier(head, feats, Config().optim.weight_decay)
    torch.testing.assert_close(w_tool, w_ref)
    saved = np.load(out)
    assert saved.shape == (6, 16) and saved.dtype == np.float32
    np.testing.assert_allclose(saved, w_ref.numpy(), rtol=1e-6)


def test_rp_recover_cli_on_synthetic_data_and_refuses_other_heads(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt_last.pt")
    _write_checkpoint(ckpt, "rp")
    out = str(tmp_path / "sub" / "W.npy")
    assert rp_recover.main(["--checkpoint", ckpt, "--out", out, "--batches", "1", "--batch-size", "4"]) == 0
    assert np.load(out).shape == (6, 16) and np.isfinite(np.load(out)).all()
    other = str(tmp_path / "full.pt")
    _write_checkpoint(other, "full")
    with pytest.raises(ValueError, match="trained with head.name='full'; recovery needs an RP-softmax"):
        rp_recover.recover_from_checkpoint(other, out)
    # the CLI says it in one line (exit status 2, no traceback) and leaves the earlier output alone
    before = np.load(out)
    capsys.readouterr()
    assert rp_recover.main(["--checkpoint", other, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "head.name='full'" in err and "head.name='rp'" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    np.testing.assert_array_equal(np.load(out), before)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert rp_recover.main(["--checkpoint", str(tmp_path / "junk.pt"), "--out", out]) == 2
    assert "junk.pt: cannot load checkpoint" in capsys.readouterr().err
    assert rp_recover.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", out]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

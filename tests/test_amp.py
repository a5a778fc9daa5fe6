"""Mixed precision as CUDA runs it, checked on CPU (issue: correct on CUDA).

CPU autocast differs from CUDA's: CUDA runs acos, exp, softmax, cross-entropy... in fp32 and the
matmul in bf16/fp16; CPU keeps most ops in the low dtype. So these tests either emulate CUDA's rule
(``cuda_acos``: acos forced to fp32 under autocast) or check dtypes and values directly: every head's
logits are fp32 under autocast and equal the fp32 computation, ArcFace's gradient stays finite where
a target cosine is 1 in fp16, and the CPK probe's masses are fp32/fp64 and never exceed 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.config import HeadConfig
from hfsoftmax.heads import build_head
from hfsoftmax.heads.full import _sqrt_eps, margin_logits
from test_selective import head_on, local_store

B, K, D = 6, 12, 8


@pytest.fixture
def cuda_acos(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's autocast rule for acos: under autocast its result is fp32 whatever its input."""
    orig = torch.acos

    def acos(x: torch.Tensor) -> torch.Tensor:
        return orig(x.float()) if torch.is_autocast_enabled("cpu") else orig(x)

    monkeypatch.setattr(torch, "acos", acos)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, K, (B,), generator=g)


def _head(name: str, margin: str) -> torch.nn.Module:
    cfg = HeadConfig(name=name, margin=margin, scale=16.0, m1=1.1, m2=0.2, m3=0.1)
    cfg.rp.proj_dim = 4
    torch.manual_seed(1)
    return build_head(cfg, K, D)


@pytest.mark.parametrize("margin", ["none", "cosface", "arcface", "combined"])
@pytest.mark.parametrize("name", ["full", "rp"])
def test_head_logits_are_fp32_under_autocast(name: str, margin: str, cuda_acos: None) -> None:
    head = _head(name, margin)
    f, y = _data()
    ref_logits = margin_logits(head.project(f) if name == "rp" else f, head.weight, y, margin, 16.0, head.margin_m)
    ref_loss = head(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = head.project(f) if name == "rp" else f
        logits = margin_logits(x, head.weight, y, margin, 16.0, head.margin_m)
        loss = head(f, y)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)


def test_combined_margin_under_cuda_autocast_rule(cuda_acos: None) -> None:
    """The scatter of the combined margin saw a bf16 cos and an fp32 acos result on CUDA."""
    head = _head("full", "combined")
    f, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(f.bfloat16(), y)             # the backbone's bf16 output
    loss.backward()
    assert torch.isfinite(head.weight.grad).all()


def test_mach_logits_fp32_under_autocast() -> None:
    cfg = HeadConfig(name="mach")
    cfg.mach.num_hashes, cfg.mach.num_buckets = 2, 4
    torch.manual_seed(0)
    head = build_head(cfg, K, D)
    f, y = _data()
    ref = head(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.logits(f).dtype == torch.float32
        loss = head(f.bfloat16(), y)
    torch.testing.assert_close(loss, head(f.bfloat16().float(), y), rtol=0, atol=0)
    assert abs(float(loss) - float(ref)) < 0.05


def test_arcface_fp16_target_cosine_one_has_finite_gradient() -> None:
    """A target cosine of exactly 1 in fp16: sqrt(1 - cos^2) clamped at 1e-12 (= 0 in fp16) gave an
    inf gradient; the head now computes in fp32, and the clamp is dtype-aware where fp16 remains."""
    f = torch.randn(B, D)
    w = torch.randn(K, D)
    y = torch.arange(B)
    w[:B] = f                                        # target rows parallel to the features: cos = 1
    for dtype in (torch.float16, torch.bfloat16):
        fx = f.to(dtype).requires_grad_()
        wx = w.to(dtype).requires_grad_()
        logits = margin_logits(fx, wx, y, "arcface", 64.0, 0.5)
        assert logits.dtype == torch.float32
        F.cross_entropy(logits, y).backward()
        assert torch.isfinite(fx.grad).all() and torch.isfinite(wx.grad).all()
    assert _sqrt_eps(torch.float16) > 0 and torch.tensor(_sqrt_eps(torch.float16), dtype=torch.float16) > 0
    assert _sqrt_eps(torch.float32) == 1e-12


def test_cpk_probe_is_fp32_under_autocast() -> None:
    """The probe's log-partition and masses equal the fp32 ones under bf16 autocast; mass <= 1."""
    K2, D2 = 300, 16
    store = local_store(K2, D2, init_std=0.5)
    head = head_on(store, 30, margin="cosface", cpk_every=1)
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.standard_normal((8, D2)).astype(np.float32))
    head.begin_step(0, 0.0)
    lse, probs = head.exact_mass(feats, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lse_a, probs_a = head.exact_mass(feats, 30)
    assert lse_a.dtype == torch.float64
    torch.testing.assert_close(lse_a, lse, rtol=0, atol=1e-9)
    torch.testing.assert_close(probs_a, probs, rtol=0, atol=1e-9)
    labels = torch.from_numpy(rng.integers(0, K2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(feats.bfloat16(), labels)
    st = head.stats()
    assert 0 < st["cpk_active"] <= 1.0 + 1e-9 and 0 < st["cpk_exact"] <= 1.0 + 1e-9

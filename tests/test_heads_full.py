"""Full softmax: CosFace / ArcFace logits against the direct formulas on hand-made cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.heads import FullSoftmax, margin_logits


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_cosface_and_arcface_hand_made():
    # one feature at 0 deg; classes at 30, 90 and 170 degrees; feature norm 3 (normalisation must remove it)
    f = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([_unit(30), _unit(90), _unit(170)], dtype=torch.float64) * torch.tensor([[2.0], [0.5], [1.0]], dtype=torch.float64)
    s, m = 10.0, 0.3
    cos = [math.cos(math.radians(a)) for a in (30, 90, 170)]
    # target = class 0 (theta = 30 deg)
    got = margin_logits(f, w, torch.tensor([0]), "cosface", s, m)[0]
    want = torch.tensor([s * (cos[0] - m), s * cos[1], s * cos[2]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    got = margin_logits(f, w, torch.tensor([0]), "arcface", s, m)[0]
    want = torch.tensor([s * math.cos(math.radians(30) + m), s * cos[1], s * cos[2]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    # target = class 2 (theta = 170 deg, theta + m > pi): the monotone continuation cos - m sin m
    got = margin_logits(f, w, torch.tensor([2]), "arcface", s, m)[0]
    assert torch.allclose(got[2], torch.tensor(s * (cos[2] - m * math.sin(m)), dtype=torch.float64), atol=1e-12)
    # plain: raw inner products, no scale
    got = margin_logits(f, w, torch.tensor([0]), "none", s, m)[0]
    assert torch.allclose(got, (f @ w.t())[0])


def test_full_head_loss_equals_cross_entropy_formula():
    torch.manual_seed(0)
    head = FullSoftmax(7, 5, margin="arcface", scale=16.0, margin_m=0.4).double()
    f = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 6, 1, 2])
    cos = F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).t()
    theta = torch.acos(cos.gather(1, y[:, None]).clamp(-1, 1))
    logits = cos.clone()
    logits.scatter_(1, y[:, None], torch.cos(theta + 0.4))      # all thetas + m < pi for random data? check
    assert (theta + 0.4 < math.pi).all()
    want = F.cross_entropy(16.0 * logits, y)
    assert torch.allclose(head(f, y), want, atol=1e-10)


def test_topk_blocks_equal_dense():
    torch.manual_seed(1)
    head = FullSoftmax(1000, 8, margin="cosface")
    f = torch.randn(4, 8)
    v1, i1 = head.topk(f, k=5, block_size=77)
    v2, i2 = head.scores(f).topk(5)
    assert torch.equal(i1, i2) and torch.allclose(v1, v2)
    # blocks smaller than k (the first blocks cannot fill the top k on their own)
    v3, i3 = head.topk(f, k=5, block_size=2)
    assert torch.equal(i3, i2) and torch.allclose(v3, v2)


def test_feature_dim_mismatch():
    head = FullSoftmax(10, 8)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        head(torch.randn(2, 9), torch.tensor([0, 1]))


def test_combined_margin_equals_the_direct_formula_and_its_special_cases():
    """cos(m1 * theta + m2) - m3 on the target logit, on the full and the selective head; (1, 0, m)
    is CosFace and (1, m, 0) ArcFace wherever theta + m <= pi."""
    import math

    import numpy as np

    from hfsoftmax.config import HeadConfig
    from hfsoftmax.heads import build_head
    from hfsoftmax.heads.margin import margin_logits
    from hfsoftmax.heads.selective import SelectiveSoftmax
    from paramserver.store import WeightStore

    g = torch.Generator().manual_seed(0)
    F_, W = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(10, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 9, 1, 2])
    got = margin_logits(F_, W, y, "combined", 16.0, (1.2, 0.25, 0.1))
    cos = torch.nn.functional.normalize(F_, dim=1) @ torch.nn.functional.normalize(W, dim=1).t()
    want = cos.clone()
    for i, c in enumerate(y.tolist()):
        want[i, c] = math.cos(1.2 * math.acos(float(cos[i, c])) + 0.25) - 0.1
    torch.testing.assert_close(got, 16.0 * want)
    torch.testing.assert_close(margin_logits(F_, W, y, "combined", 8.0, (1.0, 0.0, 0.35)),
                               margin_logits(F_, W, y, "cosface", 8.0, 0.35))
    torch.testing.assert_close(margin_logits(F_, W, y, "combined", 8.0, (1.0, 0.5, 0.0)),
                               margin_logits(F_, W, y, "arcface", 8.0, 0.5))   # theta + 0.5 < pi here
    cfg = HeadConfig(name="full", margin="combined", scale=16.0, m1=1.2, m2=0.25, m3=0.1)
    full = build_head(cfg, 10, 8)
    with torch.no_grad():
        full.weight.copy_(W.float())
    store = WeightStore(10, 8)
    store.set_rows(np.arange(10), W.float().numpy())
    cfg_sel = HeadConfig(name="hf", margin="combined", scale=16.0, m1=1.2, m2=0.25, m3=0.1, num_active=10)
    sel = SelectiveSoftmax.from_config(cfg_sel, store, 10, 8)
    sel.begin_step(0, 0.0)
    loss_sel = sel(F_.float().clone().requires_grad_(), y)
    torch.testing.assert_close(loss_sel, full(F_.float(), y))

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

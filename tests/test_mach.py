"""MACH head: parity with full softmax under identity hashes, hash determinism and checkpointing,
the count-min estimator, a separable toy problem, and refusal of configs that gain nothing."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.config import Config
from hfsoftmax.heads import FullSoftmax, build_head
from hfsoftmax.heads.mach import MachHead, default_num_buckets


def test_identity_hash_reduces_to_full_softmax():
    torch.manual_seed(0)
    K, d, N = 23, 8, 17
    full = FullSoftmax(K, d)
    mach = MachHead(K, d, num_hashes=1, num_buckets=K, identity_hash=True, allow_no_gain=True)
    with torch.no_grad():
        mach.weight.copy_(full.weight[None])
    x = torch.randn(N, d)
    y = torch.randint(0, K, (N,))
    assert torch.equal(mach.buckets(torch.arange(K)), torch.arange(K)[None])
    loss_f, loss_m = full(x, y), mach(x, y)
    torch.testing.assert_close(loss_m, loss_f)
    loss_f.backward()
    loss_m.backward()
    torch.testing.assert_close(mach.weight.grad[0], full.weight.grad)
    # Scores are the softmax of the full logits (the same ranking).
    torch.testing.assert_close(mach.scores(x), full.scores(x).softmax(1))
    assert torch.equal(mach.topk(x, 5, block_size=4)[1], full.topk(x, 5)[1])


def test_identity_with_several_hashes_is_mean_of_full_losses():
    # R identical identity hashes with different weights: loss is the mean of R full-softmax losses.
    torch.manual_seed(1)
    K, d, R = 12, 5, 3
    mach = MachHead(K, d, num_hashes=R, num_buckets=K, identity_hash=True, allow_no_gain=True)
    x, y = torch.randn(9, d), torch.randint(0, K, (9,))
    ref = torch.stack([F.cross_entropy(x @ mach.weight[r].t(), y) for r in range(R)]).mean()
    torch.testing.assert_close(mach(x, y), ref)


def test_hashes_deterministic_from_seed_and_fill_every_bucket():
    K, d, R, B = 1000, 4, 6, 40
    h1 = MachHead(K, d, R, B, seed=3)
    h2 = MachHead(K, d, R, B, seed=3)
    h3 = MachHead(K, d, R, B, seed=4)
    ids = torch.arange(K)
    assert torch.equal(h1.buckets(ids), h2.buckets(ids))
    assert not torch.equal(h1.buckets(ids), h3.buckets(ids))
    table = h1.buckets(ids)                                         # [R, K]
    assert table.shape == (R, K) and int(table.min()) >= 0 and int(table.max()) < B
    for r in range(R):
        assert bool((torch.bincount(table[r], minlength=B) > 0).all())
    # The hash is the documented formula.
    a, b, p = int(h1.hash_a[2]), int(h1.hash_b[2]), int(h1.hash_p)
    assert [int(v) for v in table[2, :50]] == [((a * k + b) % p) % B for k in range(50)]


def test_hashes_survive_checkpoint():
    K, d, R, B = 500, 6, 4, 30
    src = MachHead(K, d, R, B, seed=11)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = MachHead(K, d, R, B, seed=12)                              # different hashes before loading
    ids = torch.arange(K)
    assert not torch.equal(src.buckets(ids), dst.buckets(ids))
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(src.buckets(ids), dst.buckets(ids))
    x = torch.randn(5, d)
    torch.testing.assert_close(dst.scores(x), src.scores(x))


def test_estimator_with_perfect_meta_classifiers_ranks_true_class_first():
    # If every meta-classifier puts all mass on h_r(y), y scores exactly 1 and any other class less,
    # unless it shares y's bucket in all R tables (probability B^-R; none here, checked).
    K, R, B = 2000, 8, 20
    head = MachHead(K, 3, R, B, seed=0)
    y = torch.tensor([0, 7, 1999, 1234])
    table = head.buckets(torch.arange(K))                              # [R, K]
    probs = F.one_hot(head.buckets(y), B).float()                      # [R, N, B]
    scores = head._gather(probs, 0, K)                                 # [N, K]
    torch.testing.assert_close(scores.gather(1, y[:, None]).squeeze(1), torch.ones(4))
    for n, label in enumerate(y.tolist()):
        full_collisions = (table == table[:, label:label + 1]).all(0).sum().item()
        assert full_collisions == 1                                    # only the class itself
        assert int(scores[n].argmax()) == label
        assert float(scores[n].topk(2).values[1]) < 1.0


def test_blockwise_scores_and_topk_match_full_scores():
    torch.manual_seed(2)
    K, d = 301, 10
    head = MachHead(K, d, num_hashes=4, num_buckets=16, hidden=7, seed=5)
    x = torch.randn(6, d)
    full = head.scores(x)
    torch.testing.assert_close(torch.cat([head.scores_block(x, s, min(s + 64, K)) for s in range(0, K, 64)], 1), full)
    v, i = head.topk(x, 5, block_size=50)
    v_ref, _ = full.topk(5, dim=1)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(full.gather(1, i), v_ref)
    v3, i3 = head.topk(x, 5, block_size=3)  # blocks smaller than k
    torch.testing.assert_close(v3, v_ref)
    torch.testing.assert_close(full.gather(1, i3), v_ref)
    # Each row of bucket probabilities sums to 1, so class scores average to 1/B over a bucket's members.
    assert torch.allclose(head.bucket_probs(x).sum(-1), torch.ones(4, 6))


def test_separable_toy_problem_true_class_ranked_first():
    torch.manual_seed(0)
    # R * B = 96 < K. A bucket is the union of ~17 random classes, which a linear layer on d = 32
    # cannot separate from the rest; the per-head hidden layer (the config's mach.hidden) can.
    K, d, R, B = 200, 32, 8, 12
    centres = F.normalize(torch.randn(K, d), dim=1) * 4.0
    head = MachHead(K, d, R, B, hidden=64, seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(150):
        y = torch.randint(0, K, (256,))
        loss = head(centres[y] + 0.3 * torch.randn(256, d), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.arange(K).repeat(2)
    x = centres[y] + 0.3 * torch.randn(len(y), d)
    _, top = head.topk(x, 5, block_size=64)
    top1 = (top[:, 0] == y).float().mean().item()
    top5 = (top == y[:, None]).any(1).float().mean().item()
    assert top1 > 0.95 and top5 > 0.99, (top1, top5)
    assert head.param_ratio() == pytest.approx(R * (64 * d + 64 + B * 64) / (K * d))


def test_hidden_layer_parameters_and_gradients():
    K, d, R, B, H = 400, 16, 4, 20, 8
    head = MachHead(K, d, R, B, hidden=H)
    assert head.num_parameters() == R * (H * d + H + B * H)
    x = torch.randn(3, d, requires_grad=True)
    head(x, torch.tensor([0, 5, 399])).backward()
    assert x.grad is not None and head.hidden_weight.grad is not None and float(x.grad.abs().sum()) > 0


def test_config_builds_mach_and_default_buckets():
    cfg = Config()
    cfg.head.name = "mach"
    cfg.head.mach.num_hashes = 16
    head = build_head(cfg.head, 100_000, 64)
    assert isinstance(head, MachHead)
    assert head.num_buckets == default_num_buckets(100_000, 16) == 317
    assert head.num_hashes * head.num_buckets < 100_000
    assert default_num_buckets(1_000_000, 16) == 1000
    assert default_num_buckets(100, 16) == 3                           # capped so R * B <= K / 2


def test_bad_input_is_refused_with_the_values():
    cfg = Config()
    cfg.head.name = "mach"
    cfg.head.mach.num_hashes = 16
    cfg.head.mach.num_buckets = 100
    with pytest.raises(ValueError, match=r"R \* B = 16 \* 100 = 1600 .* K = 1000"):
        build_head(cfg.head, 1000, 8)
    with pytest.raises(ValueError, match="K = 40 classes is too few for R = 16"):
        default_num_buckets(40, 16)
    with pytest.raises(ValueError, match=r"R \* B = 2 \* 60 = 120 is not smaller than K = 100"):
        MachHead(100, 4, 2, 60)
    with pytest.raises(ValueError, match="num_buckets B must be in"):
        MachHead(100, 4, 2, 1)
    with pytest.raises(ValueError, match="identity_hash needs num_buckets == num_classes"):
        MachHead(100, 4, 1, 50, identity_hash=True, allow_no_gain=True)
    head = MachHead(100, 4, 2, 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 100\), got min 0, max 100"):
        head(torch.randn(2, 4), torch.tensor([0, 100]))
    with pytest.raises(ValueError, match=r"features must be \[B, 4\]"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    cfg.head.mach.num_buckets = 10
    cfg.head.margin = "arcface"          # the one margin rule (heads/margin.py): MACH trains plain
    assert isinstance(build_head(cfg.head, 1000, 8), MachHead) and cfg.head.margin == "none"

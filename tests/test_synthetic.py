"""Synthetic identities: deterministic, memory independent of K, identity survives nuisance."""
import numpy as np
import torch

from hfsoftmax.data.synthetic import SyntheticIdentities, SyntheticRenderer, SyntheticSpec, heldout_pairs


def test_deterministic_across_instances():
    spec = SyntheticSpec(num_classes=50, samples_per_class=5, image_size=16, families=5, seed=3)
    a, b = SyntheticIdentities(spec), SyntheticIdentities(spec)
    for idx in (0, 7, 249):
        xa, ya = a[idx]
        xb, yb = b[idx]
        assert ya == yb and torch.equal(xa, xb)
    assert not torch.equal(a[0][0], a[1][0])          # samples of one identity differ (nuisance)
    other = SyntheticIdentities(SyntheticSpec(num_classes=50, samples_per_class=5, image_size=16, families=5, seed=4))
    assert not torch.equal(a[0][0], other[0][0])      # the seed matters


def test_ten_million_classes_without_memory():
    spec = SyntheticSpec(num_classes=10_000_000, samples_per_class=100, image_size=16)
    ds = SyntheticIdentities(spec)
    x, y = ds[len(ds) - 1]
    assert y == 9_999_999 and x.shape == (3, 16, 16)
    assert ds.renderer.basis.nbytes < 1_000_000       # O(D * S^2), not O(K)


def test_identity_signal_survives_nuisance():
    r = SyntheticRenderer(SyntheticSpec(num_classes=10, samples_per_class=10, image_size=16))
    cos = lambda u, v: float(np.dot(u.ravel(), v.ravel()) / np.linalg.norm(u) / np.linalg.norm(v))
    same = np.mean([cos(r.render(k, 0) - r.render(k, 0).mean(), r.render(k, 1) - r.render(k, 1).mean()) for k in range(10)])
    diff = np.mean([cos(r.render(k, 0) - r.render(k, 0).mean(), r.render(k + 1, 1) - r.render(k + 1, 1).mean()) for k in range(10)])
    assert same > diff + 0.1
    assert same < 0.95                                 # but not trivially identical


def test_families_make_hard_negatives():
    r = SyntheticRenderer(SyntheticSpec(num_classes=100, samples_per_class=2, families=10, family_spread=0.3))
    kin = np.dot(r.code(3), r.code(13))               # same family (3 % 10 == 13 % 10)
    stranger = np.dot(r.code(3), r.code(14))
    assert kin > stranger + 0.3


def test_heldout_pairs_are_unseen_identities():
    spec = SyntheticSpec(num_classes=20, samples_per_class=3, image_size=16)
    images, issame = heldout_pairs(spec, 8, 10)
    assert images.shape == (20, 3, 16, 16) and issame.sum() == 5
    images2, issame2 = heldout_pairs(spec, 8, 10)
    assert torch.equal(images, images2) and (issame == issame2).all()

"""Backbones: shapes, the face-ResNet layout, and the factory's errors."""
import os
import subprocess
import sys

import pytest
import torch

from hfsoftmax.backbones import BACKBONES, get_backbone
from hfsoftmax.backbones.resnet import RESNET_DEPTHS, IRBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,size", [("tiny", 32), ("hynet", 112), ("resnet18", 112)])
def test_forward_shapes(name, size):
    torch.manual_seed(0)
    net = get_backbone(name, 64, size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("depth", sorted(RESNET_DEPTHS))
def test_resnet_unit_counts(depth):
    net = get_backbone(f"resnet{depth}", 512, 112)
    assert sum(isinstance(m, IRBlock) for m in net.modules()) == sum(RESNET_DEPTHS[depth])
    # stride-1 stem: the first conv keeps 112x112, four stages halve it to 7x7 before the FC
    assert net.stem[0].stride == (1, 1)
    assert net.head[3].in_features == 512 * 7 * 7


def test_resnet50_parameter_count_is_the_face_ir50():
    # IR-50 with a 512-d embedding has ~43.6M parameters (vs 25.6M for ImageNet ResNet-50).
    n = sum(p.numel() for p in get_backbone("resnet50", 512, 112).parameters())
    assert 43e6 < n < 44.5e6, n


def test_unknown_backbone_and_bad_size():
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
        get_backbone("resnet51", 64)
    with pytest.raises(ValueError, match="divisible by 16"):
        get_backbone("resnet18", 64, 100)
    assert "resnet100" in BACKBONES


def test_test_distributed_script_passes_with_two_gloo_ranks():
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable, PYTHONPATH=ROOT)
    r = subprocess.run(["sh", "scripts/test_distributed.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: all_reduce over 2 ranks (gloo" in r.stdout


def test_mobilefacenet_shapes_and_size():
    """MobileFaceNet (arcface_torch name mbf): ~1M parameters, 112 -> d, trains (gradients flow)."""
    from hfsoftmax.backbones import get_backbone

    m = get_backbone("mbf", 128, 112)
    n = sum(p.numel() for p in m.parameters())
    assert 0.9e6 < n < 1.1e6, n
    x = torch.randn(2, 3, 112, 112)
    y = m(x)
    assert y.shape == (2, 128)
    (y[0] * torch.arange(128.0)).sum().backward()     # not y.sum(): the BN1d output sums to a constant
    assert m.body[0][0].weight.grad.abs().sum() > 0
    assert get_backbone("mobilefacenet", 64, 64).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 64)

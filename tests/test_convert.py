"""arcface_torch IResNet weights load into FaceResNet, and MobileFaceNet (mbf) weights into our
MobileFaceNet at their scale and blocks: the same function, by name mapping only.

``TheirIResNet`` below is written here from the architecture as arcface_torch lays it out (module
names conv1/bn1/prelu, layerL.i.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}, bn2/dropout/fc/features),
so its state dict has their key names; the converted weights must give the same embeddings.
``TheirMobileFaceNet`` likewise (layers.0..7 / conv_sep / features, each block's modules in .layers)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hfsoftmax.backbones import get_backbone
from hfsoftmax.backbones.convert import (arcface_torch_depth, arcface_torch_mbf_config, backbone_state,
                                         from_arcface_torch, from_arcface_torch_mbf)
from hfsoftmax.backbones.mobilefacenet import ARCFACE_TORCH, MobileFaceNet


class _Unit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class TheirIResNet(nn.Module):
    def __init__(self, units=(2, 2, 2, 2), d=32):
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        cin = 64
        for L, (n, cout) in enumerate(zip(units, (64, 128, 256, 512)), 1):
            blocks = []
            for i in range(n):
                blocks.append(_Unit(cin, cout, 2 if i == 0 else 1))
                cin = cout
            setattr(self, f"layer{L}", nn.Sequential(*blocks))
        self.bn2, self.dropout = nn.BatchNorm2d(512), nn.Dropout(0.0)
        self.fc, self.features = nn.Linear(512 * 7 * 7, d), nn.BatchNorm1d(d)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.dropout(self.bn2(x)), 1)))


def test_arcface_torch_weights_give_the_same_embeddings(tmp_path):
    torch.manual_seed(0)
    theirs = TheirIResNet().eval()
    for m in theirs.modules():          # non-trivial BN statistics, so a swapped BN would show
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}    # as saved from DDP
    assert arcface_torch_depth(state) == 18
    ours = get_backbone("r18", 32, 112).eval()
    ours.load_state_dict(from_arcface_torch(state))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    # the eval loader takes a bare backbone.pth; training takes it as model.pretrained
    torch.save(state, tmp_path / "backbone.pth")
    from hfsoftmax.eval.cli import load_model
    from hfsoftmax.train import load_pretrained
    model, size, cfg = load_model(str(tmp_path / "backbone.pth"))
    assert size == 112 and cfg["model"]["backbone"] == "resnet18"
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-4, atol=1e-5)
    fresh = get_backbone("resnet18", 32, 112).eval()
    load_pretrained(fresh, str(tmp_path / "backbone.pth"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x), rtol=1e-4, atol=1e-5)


# arcface_torch MobileFaceNet ("mbf"), laid out as theirs: a conv-BN(-PReLU) block keeps its modules in
# `.layers`; a unit (1x1 expand, depthwise 3x3, linear 1x1, skip when stride 1) and a run of units too;
# the net is `layers` (a list of 8), `conv_sep` and `features` (GDC, flatten, Linear, BN1d).
class _TheirBlock(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, p=0, g=1, act=True):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*mods, *([nn.PReLU(cout)] if act else []))

    def forward(self, x):
        return self.layers(x)


class _TheirUnit(nn.Module):
    def __init__(self, cin, cout, mid, stride, residual):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(_TheirBlock(cin, mid), _TheirBlock(mid, mid, 3, stride, 1, mid),
                                    _TheirBlock(mid, cout, act=False))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class _TheirRun(nn.Module):
    def __init__(self, c, n, mid):
        super().__init__()
        self.layers = nn.Sequential(*(_TheirUnit(c, c, mid, 1, True) for _ in range(n)))

    def forward(self, x):
        return self.layers(x)


class _TheirGDC(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(_TheirBlock(512, 512, 7, 1, 0, 512, act=False), nn.Flatten(),
                                    nn.Linear(512, d, bias=False), nn.BatchNorm1d(d))

    def forward(self, x):
        return self.layers(x)


class TheirMobileFaceNet(nn.Module):
    def __init__(self, d=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        a, b = 64 * scale, 128 * scale
        second = _TheirBlock(a, a, 3, 1, 1, 64) if blocks[0] == 1 else _TheirRun(a, blocks[0], 128)
        self.layers = nn.ModuleList([
            _TheirBlock(3, a, 3, 2, 1), second,
            _TheirUnit(a, a, 128, 2, False), _TheirRun(a, blocks[1], 128),
            _TheirUnit(a, b, 256, 2, False), _TheirRun(b, blocks[2], 256),
            _TheirUnit(b, b, 512, 2, False), _TheirRun(b, blocks[3], 256)])
        self.conv_sep = _TheirBlock(b, 512)
        self.features = _TheirGDC(d)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def _randomise(net, x):
    """Random BN affines and PReLU slopes, then BN statistics of the data (activations stay O(1))."""
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.momentum = None                        # running stats = this batch's
        elif isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    net.train()
    with torch.no_grad():
        net(x)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))   # not exactly the batch's
    return net.eval()


@pytest.mark.parametrize("scale,blocks,name", [(2, (1, 4, 6, 2), "arcface_mbf"),   # their mbf
                                               (1, (2, 1, 2, 1), None)])           # b0 > 1, as mbf_large
def test_arcface_torch_mbf_weights_give_the_same_embeddings(tmp_path, scale, blocks, name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 112, 112)
    theirs = _randomise(TheirMobileFaceNet(512, blocks, scale), x)
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}    # as saved from DDP
    assert arcface_torch_mbf_config(state) == {"scale": scale, "blocks": blocks}
    ours = MobileFaceNet(512, 112, scale=scale, blocks=blocks).eval()
    ours.load_state_dict(from_arcface_torch_mbf(state))
    with torch.no_grad():
        want = theirs(x)
        assert want.std() > 0.3                       # not vanishing: 1e-5 below is a real check
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-5)
    if name is None:
        with pytest.raises(ValueError, match="is none of"):
            backbone_state(state)
        return
    converted, model = backbone_state(state)
    assert model == {"backbone": name, "feature_dim": 512}
    MobileFaceNet(512, 112, **ARCFACE_TORCH[name]).load_state_dict(converted)      # strict: every key, every shape
    # training takes it as model.pretrained
    torch.save(state, tmp_path / "backbone.pth")
    from hfsoftmax.train import load_pretrained
    fresh = MobileFaceNet(512, 112, **ARCFACE_TORCH[name]).eval()
    load_pretrained(fresh, str(tmp_path / "backbone.pth"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-5)
    # scripts/eval.sh auto backbone.pth: the eval loader names and builds the net from the file alone
    from hfsoftmax.eval.cli import load_model
    model, size, cfg = load_model(str(tmp_path / "backbone.pth"))
    assert size == 112 and cfg["model"]["backbone"] == name
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_arcface_torch_mbf_large_layout_maps_onto_ours():
    """mbf_large (scale 4, blocks (2, 8, 12, 4)): every key and shape lands on ours (no forward: size)."""
    theirs = TheirMobileFaceNet(512, (2, 8, 12, 4), 4)
    state = theirs.state_dict()
    assert backbone_state(state)[1] == {"backbone": "arcface_mbf_large", "feature_dim": 512}
    ours = MobileFaceNet(512, 112, **ARCFACE_TORCH["arcface_mbf_large"]).state_dict()
    converted = from_arcface_torch_mbf(state)
    assert sorted(converted) == sorted(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)

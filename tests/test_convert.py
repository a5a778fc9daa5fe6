"""arcface_torch IResNet weights load into FaceResNet: the same function, by name mapping only.

``TheirIResNet`` below is written here from the architecture as arcface_torch lays it out (module
names conv1/bn1/prelu, layerL.i.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}, bn2/dropout/fc/features),
so its state dict has their key names; the converted weights must give the same embeddings."""
from __future__ import annotations

import torch
from torch import nn

from hfsoftmax.backbones import get_backbone
from hfsoftmax.backbones.convert import arcface_torch_depth, from_arcface_torch


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

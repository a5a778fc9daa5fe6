"""Synthetic identities: a face-recognition-shaped dataset that renders itself from a seed.

Why: tests, the README demo and the benchmarks need K up to millions of identities with no download
and no storage, and the task must be one a network has to *learn*: identity has to survive nuisance.

How an image of (class k, sample i) is made, all deterministic from (seed, k, i):
  1. identity code z_k in R^D (D = ``code_dim``): a unit Gaussian vector drawn from rng(seed, k).
     With ``families`` > 0 the classes are grouped in families whose members share a centre,
     z_k = normalise(c_f + spread * e_k), so look-alike identities (hard negatives) exist.
  2. a clean "face" of side S + 2*pad: mean template + sum_j z_k[j] * basis_j, where the D smooth
     RGB basis patterns and the template depend on the seed only (memory O(D * S^2), not O(K)).
  3. nuisance from rng(seed, k, i): pose = a random crop offset (translation up to ``pad``) and a
     horizontal flip, light = contrast/brightness gain and a linear illumination gradient, noise =
     i.i.d. pixel noise. ``nuisance`` scales all three.
Held-out identities for verification are class ids K .. K + V - 1 (never trained on), in the same
families as the training identities, so verification accuracy measures generalisation to new faces.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

_ID_STREAM, _SAMPLE_STREAM, _FAMILY_STREAM, _PAIR_STREAM, _IDENT_STREAM = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines the identities; two equal specs render identical images."""
    num_classes: int
    samples_per_class: int
    image_size: int = 32
    families: int = 0
    family_spread: float = 0.35
    nuisance: float = 1.0
    seed: int = 0
    code_dim: int = 48


class SyntheticRenderer:
    """Renders (class, sample) -> float32 image [3, S, S] in [-1, 1]; holds only the basis."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        s = spec.image_size
        self.pad = max(1, s // 8)
        side = s + 2 * self.pad
        g = torch.Generator().manual_seed(10_000 + spec.seed)
        # Smooth patterns: random coarse grids upsampled bicubically. Several scales so that the
        # identity lives in both coarse layout and finer detail.
        parts = []
        for grid, n in ((4, spec.code_dim // 3), (7, spec.code_dim // 3), (12, spec.code_dim - 2 * (spec.code_dim // 3))):
            coarse = torch.randn(n, 3, grid, grid, generator=g)
            parts.append(F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False))
        basis = torch.cat(parts)                                              # [D, 3, side, side]
        basis = basis / basis.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        self.basis = basis.flatten(1).numpy().astype(np.float32)             # [D, 3*side*side]
        # A shared "mean face": the same coarse structure for everybody, as real aligned faces have.
        tmpl = F.interpolate(torch.randn(1, 3, 3, 3, generator=g), size=(side, side), mode="bicubic",
                             align_corners=False)[0]
        self.template = (0.5 * tmpl / tmpl.std()).numpy().astype(np.float32)  # [3, side, side]
        self.side = side
        yy, xx = np.meshgrid(np.linspace(-1, 1, s, dtype=np.float32), np.linspace(-1, 1, s, dtype=np.float32),
                             indexing="ij")
        self._grid = (yy, xx)

    # -- identity codes --------------------------------------------------------------------------
    def family_of(self, k: int) -> int:
        """Family index of class k (held-out ids wrap into the same families)."""
        return k % self.spec.families

    def code(self, k: int) -> np.ndarray:
        """Identity code z_k [D] (unit norm)."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, _ID_STREAM, k])
        e = rng.standard_normal(spec.code_dim).astype(np.float32)
        e /= np.linalg.norm(e)
        if spec.families > 0:
            frng = np.random.default_rng([spec.seed, _FAMILY_STREAM, self.family_of(k)])
            c = frng.standard_normal(spec.code_dim).astype(np.float32)
            c /= np.linalg.norm(c)
            e = c + spec.family_spread * e
            e /= np.linalg.norm(e)
        return e

    # -- rendering -------------------------------------------------------------------------------
    def render(self, k: int, i: int) -> np.ndarray:
        """Image of class k, sample i: float32 [3, S, S], roughly in [-1, 1]."""
        spec, s, pad = self.spec, self.spec.image_size, self.pad
        z = self.code(k) * math.sqrt(spec.code_dim) * 0.35                   # per-pattern weight ~0.35
        face = (z @ self.basis).reshape(3, self.side, self.side) + self.template
        rng = np.random.default_rng([spec.seed, _SAMPLE_STREAM, k, i])
        a = spec.nuisance
        u = rng.random(8)
        # pose: translation (crop offset) and mirror
        dy = int(round(pad + a * pad * (2 * u[0] - 1)))
        dx = int(round(pad + a * pad * (2 * u[1] - 1)))
        img = face[:, dy:dy + s, dx:dx + s]
        if a > 0 and u[2] < 0.5:
            img = img[:, :, ::-1]
        # light: gain, offset and a directional gradient
        gain = 1.0 + a * 0.4 * (2 * u[3] - 1)
        offset = a * 0.3 * (2 * u[4] - 1)
        theta = 2 * math.pi * u[5]
        yy, xx = self._grid
        shade = a * 0.3 * u[6] * (math.cos(theta) * xx + math.sin(theta) * yy)
        img = gain * img + offset + shade
        # sensor noise
        if a > 0:
            img = img + (a * 0.15) * rng.standard_normal(img.shape).astype(np.float32)
        return np.clip(img * 0.3, -1.0, 1.0).astype(np.float32)


class SyntheticIdentities(Dataset):
    """Training set: index = k * samples_per_class + i -> (image [3, S, S], k). Nothing is stored."""

    def __init__(self, spec: SyntheticSpec) -> None:
        if spec.num_classes <= 0 or spec.samples_per_class <= 0:
            raise ValueError(f"synthetic dataset needs positive num_classes and samples_per_class, "
                             f"got {spec.num_classes}, {spec.samples_per_class}")
        self.spec = spec
        self.num_classes = spec.num_classes
        self.renderer = SyntheticRenderer(spec)

    def __len__(self) -> int:
        return self.spec.num_classes * self.spec.samples_per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic index {index} out of range [0, {len(self)})")
        k, i = divmod(int(index), self.spec.samples_per_class)
        return torch.from_numpy(self.renderer.render(k, i)), k


def heldout_pairs(spec: SyntheticSpec, num_identities: int, num_pairs: int) -> tuple[torch.Tensor, np.ndarray]:
    """Verification pairs over identities the network never saw (ids K .. K + V - 1).

    Half the pairs are two samples of one identity, half two different identities (from the same
    family when families exist, so the negatives are hard). Sample indices are drawn past the
    training range so no training image is reused.

    Returns:
        images [2N, 3, S, S] (pairs interleaved) and issame bool [N].
    """
    if num_identities < 2:
        raise ValueError(f"need at least 2 held-out identities, got {num_identities}")
    renderer = SyntheticRenderer(spec)
    rng = np.random.default_rng([spec.seed, _PAIR_STREAM])
    base = spec.num_classes
    imgs: list[np.ndarray] = []
    issame = np.zeros(num_pairs, dtype=bool)
    per_family: dict[int, list[int]] = {}
    if spec.families > 0:
        for v in range(num_identities):
            per_family.setdefault(renderer.family_of(base + v), []).append(base + v)
    for p in range(num_pairs):
        a = base + int(rng.integers(num_identities))
        ia, ib = spec.samples_per_class + 2 * p, spec.samples_per_class + 2 * p + 1
        if p % 2 == 0:
            b = a
            issame[p] = True
        else:
            mates = [c for c in per_family.get(renderer.family_of(a), []) if c != a] if spec.families > 0 else []
            if mates and rng.random() < 0.5:
                b = mates[int(rng.integers(len(mates)))]
            else:
                b = base + int(rng.integers(num_identities - 1))
                b = b if b < a else b + 1
        imgs.append(renderer.render(a, ia))
        imgs.append(renderer.render(b, ib))
    return torch.from_numpy(np.stack(imgs)), issame


def heldout_samples(spec: SyntheticSpec, num_samples: int) -> tuple[torch.Tensor, np.ndarray]:
    """New images of *training* identities (closed-set identification over the K classes).

    Identities are drawn uniformly (own seeded stream); each image's sample index lies past the
    training range (i >= samples_per_class), so no training image is reused.

    Returns:
        images [N, 3, S, S] and labels int64 [N].
    """
    renderer = SyntheticRenderer(spec)
    labels = np.random.default_rng([spec.seed, _IDENT_STREAM]).integers(0, spec.num_classes, num_samples)
    imgs = [renderer.render(int(k), spec.samples_per_class + j) for j, k in enumerate(labels)]
    return torch.from_numpy(np.stack(imgs)), labels.astype(np.int64)


def spec_from_config(data_cfg) -> SyntheticSpec:
    """SyntheticSpec from a :class:`hfsoftmax.config.DataConfig`."""
    return SyntheticSpec(num_classes=data_cfg.num_classes, samples_per_class=data_cfg.samples_per_class,
                         image_size=data_cfg.image_size, families=data_cfg.families,
                         family_spread=data_cfg.family_spread, nuisance=data_cfg.nuisance, seed=data_cfg.seed)


def write_heldout_bin(spec: SyntheticSpec, num_identities: int, num_pairs: int, path: str) -> str:
    """Write the held-out pairs as an InsightFace-style .bin (JPEG bytes + issame flags)."""
    from .binset import encode_jpeg, write_bin

    images, issame = heldout_pairs(spec, num_identities, num_pairs)
    u8 = ((images.numpy().transpose(0, 2, 3, 1) * 0.5 + 0.5) * 255.0).round().clip(0, 255).astype(np.uint8)
    write_bin(path, [encode_jpeg(im) for im in u8], [bool(x) for x in issame])
    return path

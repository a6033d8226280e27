"""Sampling grid, smooth random fields and small vector helpers shared by scene sampling and rendering.

Axis conventions: arrays are numpy/SimpleITK order (Z, Y, X); points, spacings and directions are (x, y, z) mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

Range = Tuple[float, float]


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates (mm, centred on the FOV centre) of a case's sampling grid."""

    spacing: Tuple[float, float, float]  # x, y, z
    shape: Tuple[int, int, int]  # Z, Y, X
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def make(cls, spacing: Sequence[float], fov: Sequence[float]) -> "Grid":
        """Grid of ``round(fov / spacing)`` (at least 8) voxels per axis; ``spacing`` and ``fov`` are (x, y, z) mm."""
        n = [max(8, int(round(f / s))) for f, s in zip(fov, spacing)]  # x, y, z
        axes = [((np.arange(k) - (k - 1) / 2.0) * s).astype(np.float32) for k, s in zip(n, spacing)]
        return cls(tuple(float(s) for s in spacing), (n[2], n[1], n[0]), axes[0], axes[1], axes[2])

    def full(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) coordinate arrays for the whole grid."""
        return self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]

    def box(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices and broadcastable coordinates of the voxels whose centres lie in [lo, hi] (x, y, z).

        Returns ``None`` if the box misses the grid.
        """
        idx = []
        for axis, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            idx.append(slice(i0, i1))
        sl = tuple(idx)
        return sl, (self.x[None, None, sl[2]], self.y[None, sl[1], None], self.z[sl[0], None, None])


@dataclass(frozen=True)
class CosineField:
    """Smooth random field f(x, y, z) = sum_k a_k cos(wx_k x + px_k) cos(wy_k y + py_k) cos(wz_k z + pz_k).

    Evaluates with broadcasting, so it works both on grid coordinate arrays and on point arrays. The
    amplitudes are normalised so that the field's standard deviation is about 1.
    """

    amps: np.ndarray  # (K,)
    freqs: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K, 3)

    @classmethod
    def sample(cls, rng: np.random.Generator, n_terms: int, wavelength_mm: Range) -> "CosineField":
        """``n_terms`` cosine products with wavelengths log-uniform in ``wavelength_mm`` per axis."""
        wl = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), size=(n_terms, 3)))
        freqs = 2 * np.pi / wl * rng.choice([-1.0, 1.0], size=(n_terms, 3))
        phases = rng.uniform(0, 2 * np.pi, size=(n_terms, 3))
        amps = rng.normal(size=n_terms)
        amps = amps / np.sqrt(np.sum(amps ** 2) / 8.0)  # E[cos^2]^3 = 1/8 per term
        return cls(amps.astype(np.float32), freqs.astype(np.float32), phases.astype(np.float32))

    def __call__(self, x, y, z) -> np.ndarray:
        out = None
        for a, (fx, fy, fz), (px, py, pz) in zip(self.amps, self.freqs, self.phases):
            term = (a * np.cos(fx * x + px)) * np.cos(fy * y + py) * np.cos(fz * z + pz)
            out = term if out is None else out + term
        return np.asarray(out, dtype=np.float32)


def soft(signed_mm: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased occupancy in [0, 1] from a signed inside-distance in mm (positive inside)."""
    return np.clip(0.5 + signed_mm / edge, 0.0, 1.0).astype(np.float32)


def composite(image: np.ndarray, occ: np.ndarray, value) -> None:
    """In place: image <- image * (1 - occ) + value * occ."""
    image += occ * (value - image)


def unit(v: np.ndarray) -> np.ndarray:
    """``v / |v|`` (a zero vector stays ~zero)."""
    return v / max(float(np.linalg.norm(v)), 1e-9)


def fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) roughly uniform unit vectors (deterministic)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) random orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))

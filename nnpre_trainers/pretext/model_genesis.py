"""Models Genesis (Zhou et al., MedIA 2021) as a pretext task: restore a patch from four corruptions.

Sources: the official code ``MrGiovanni/ModelsGenesis`` (``pytorch/utils.py`` ``generate_pair``, defaults in
``pytorch/config.py``) and nnssl's port (``ModelGenesisTrainer``, whole-volume ``nn.MSELoss``).

Per sample, in the official order:

1. **flip** (augmentation of input *and* target): while ``random < flip_rate`` (0.4), at most 3 times, flip
   a random axis drawn from {0, 1, 2} of the official (1, X, Y, Z) sample: the channel axis (a no-op), X
   or Y, never Z (``flip_choices``);
2. **local pixel shuffling** with probability ``local_rate`` (0.5): 10,000 windows with sides uniform in
   [1, dim // 10] at uniform positions, each read from the original patch, permuted and written into the
   output in order (:func:`local_pixel_shuffle_windows`, the official process; ``local_shuffle="bricks"``
   selects the fast approximation :func:`local_pixel_shuffle`);
3. **non-linear intensity transform** with probability ``nonlinear_rate`` (0.9): a random cubic Bézier curve;
   half of the curves invert intensities (:func:`nonlinear_intensity`);
4. **painting** with probability ``paint_rate`` (0.9): in-painting with probability ``inpaint_rate`` (0.2),
   else out-painting (0.8) (:func:`in_painting`, :func:`out_painting`).

The original works on intensities in [0, 1] obtained with a *fixed* window (CT clipped to [-1000, 1000] HU,
``infinite_generator_3D.py``); nnssl feeds z-scored data unchanged, so ``np.interp`` clamps most of the range
and the U[0,1) paint noise has the wrong scale. nnU-Net's z-scored data have no fixed HU window, so by default
each patch is rescaled per channel to [0, 1] with its own min/max before steps 3-4 and mapped back afterwards
(deviation; close to the official nnU-Net variant ``competition/utils.py``, which uses per-image 0.1/99.9
percentiles); ``intensity_window=(lo, hi)`` gives the official fixed-window behaviour in z-score units (input
clipped to the window for steps 3-4). The target stays the flipped clean patch in the original (z-scored)
range. Loss: whole-volume MSE (nnssl ``nn.MSELoss``; the original adds a sigmoid because its target is in
[0, 1], we regress z-scores directly).

Deviations from the official code, on purpose:

* the per-patch [0, 1] mapping above (opt-out: ``intensity_window``);
* multi-channel patches: all channels share the shuffle windows (the official data have one channel);
* for patches too small for the official 3-voxel painting margin the margin is dropped, and window sides are
  at least 1 voxel.

Opt-in approximations (not faithful): ``flip_choices=("x", "y", "z")`` (flip any spatial axis) and
``local_shuffle="bricks"`` (:func:`local_pixel_shuffle`, ~10x faster; see its docstring for which
statistics match and which do not).

All corruption functions work on numpy (C, X, Y, Z) float32 arrays with an explicit
``numpy.random.Generator``; :class:`ModelGenesisTask` derives that generator from its ``torch.Generator``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nnpre_trainers.pretext.base import PretextSample, PretextTask, _vol, check_image, numpy_rng
from nnpre_trainers.pretext.registry import register_pretext

#: flip choices -> array axis of a (C, X, Y, Z) sample (-1: the official no-op flip of the channel axis)
FLIP_AXES = {"channel": -1, "x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class ModelGenesisConfig:
    """Model Genesis hyperparameters (defaults: official ``pytorch/config.py`` / ``utils.py``).

    Attributes:
        flip_rate: probability of each of up to ``max_flips`` successive random flips. Official 0.4.
        max_flips: official 3.
        local_rate: probability of local pixel shuffling. Official 0.5.
        num_windows: shuffling windows per patch. Official 10,000.
        max_window_fraction: maximum window side as a fraction of the patch side (``dim // 10``). Official 0.1.
        nonlinear_rate: probability of the Bézier intensity transform. Official 0.9.
        bezier_points: samples along the Bézier curve. Official 100,000 (``nTimes``).
        paint_rate: probability of painting. Official 0.9.
        inpaint_rate: given painting, probability of in-painting (else out-painting). Official 0.2
            (``outpaint_rate`` 0.8 = 1 - inpaint_rate).
        shuffle_rounds: brick shapes per patch of the fast local shuffle (ours, 64 = 4 side classes per axis;
            see :func:`local_pixel_shuffle`, which documents how it differs from the official window loop).
        shuffle_bank_size: cross-section permutations drawn per brick shape and patch (ours, 16).
        local_shuffle: ``"windows"`` (official process, default) or ``"bricks"`` (fast approximation).
        flip_choices: axes a flip is drawn from, uniformly: official ``("channel", "x", "y")`` (``"channel"`` =
            the official no-op flip of the channel axis); ``("x", "y", "z")`` flips any spatial axis.
        intensity_window: None = per-patch min/max to [0, 1] (default, see module docstring); (lo, hi) = fixed
            window in the data's units (z-scores), the official fixed-window mapping.
    """

    flip_rate: float = 0.4
    max_flips: int = 3
    local_rate: float = 0.5
    num_windows: int = 10_000
    max_window_fraction: float = 0.1
    nonlinear_rate: float = 0.9
    bezier_points: int = 100_000
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    shuffle_rounds: int = 64
    shuffle_bank_size: int = 16
    local_shuffle: str = "windows"
    flip_choices: Tuple[str, ...] = ("channel", "x", "y")
    intensity_window: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if self.local_shuffle not in ("windows", "bricks"):
            raise ValueError(f"local_shuffle must be 'windows' or 'bricks', got {self.local_shuffle!r}")
        if not self.flip_choices or any(a not in FLIP_AXES for a in self.flip_choices):
            raise ValueError(f"flip_choices must be a non-empty subset of {tuple(FLIP_AXES)}, got {self.flip_choices}")
        if self.intensity_window is not None and not (len(self.intensity_window) == 2
                                                      and float(self.intensity_window[0])
                                                      < float(self.intensity_window[1])):
            raise ValueError(f"intensity_window must be (lo, hi) with lo < hi, got {self.intensity_window}")
        for k in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "inpaint_rate"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ValueError(f"{k} must be a probability in [0, 1], got {getattr(self, k)}")
        if not 0.0 < float(self.max_window_fraction) <= 0.5:
            raise ValueError(f"max_window_fraction must be in (0, 0.5], got {self.max_window_fraction}")
        for k in ("max_flips", "num_windows"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        for k, least in (("bezier_points", 2), ("shuffle_rounds", 1), ("shuffle_bank_size", 1)):
            if int(getattr(self, k)) < least:
                raise ValueError(f"{k} must be >= {least}, got {getattr(self, k)}")


# ----------------------------------------------------------------------------------------------------------
# 1. flips
# ----------------------------------------------------------------------------------------------------------
def random_flip_axes(rng: np.random.Generator, flip_rate: float = 0.4, max_flips: int = 3,
                     choices: Tuple[str, ...] = ("channel", "x", "y")) -> List[int]:
    """Axes to flip (-1 = channel no-op, 0=X, 1=Y, 2=Z), drawn as the official ``data_augmentation`` loop.

    While ``rng.random() < flip_rate`` and fewer than ``max_flips`` flips were drawn, append an axis drawn
    uniformly from ``choices`` (official: ``random.choice([0, 1, 2])`` on a (1, X, Y, Z) sample = channel, X, Y).
    Repeated axes cancel when applied, as in the official code.
    """
    axes: List[int] = []
    while len(axes) < max_flips and rng.random() < flip_rate:
        axes.append(FLIP_AXES[choices[int(rng.integers(0, len(choices)))]])
    return axes


def apply_flips(x: np.ndarray, axes: List[int]) -> np.ndarray:
    """Flip (C, X, Y, Z) ``x`` along each spatial axis in ``axes`` in turn (-1: no-op); contiguous copy."""
    for a in axes:
        if a >= 0:
            x = np.flip(x, axis=a + 1)
    return np.array(x, order="C", copy=True)


# ----------------------------------------------------------------------------------------------------------
# 2. local pixel shuffling
# ----------------------------------------------------------------------------------------------------------
def max_window_sides(spatial_shape, max_window_fraction: float = 0.1) -> np.ndarray:
    """Largest window side per axis: ``max(1, floor(dim * fraction))`` (official ``dim // 10``)."""
    return np.array([max(1, int(math.floor(d * max_window_fraction + 1e-9))) for d in spatial_shape],
                    dtype=np.int64)


#: x permutations drawn per x slab of the brick partition (see :func:`local_pixel_shuffle`)
SHUFFLE_X_PERMS = 2


@dataclass(frozen=True)
class _AxisTables:
    """Deterministic per-axis tables of the brick partition (cached; no randomness).

    Attributes:
        values: (K, W) candidate side lengths of each of the K side classes (strata of 1..max_side), padded
            with the stratum's last value.
        cum_weights: (K, W) normalised cumulative weight of each candidate within its stratum.
        stratum_weight: (K,) total weight of each stratum.
        cum_cover: (2, dim + 1) cumulative sums of ``cover`` and ``cover ** 2``, ``cover[i]`` the probability
            that one official window covers position i of this axis (averaged over its uniform side).
    """

    values: np.ndarray
    cum_weights: np.ndarray
    stratum_weight: np.ndarray
    cum_cover: np.ndarray


@functools.lru_cache(maxsize=64)
def _axis_tables(dim: int, max_side: int, classes: int) -> _AxisTables:
    s = np.arange(1, max_side + 1)
    # an official window of side s covers an interior voxel with probability s / (dim - s + 1): the side of the
    # window that owns a covered interior voxel is distributed in proportion to that ("size-biased")
    w = s / (dim - s + 1.0)
    strata = np.array_split(np.arange(max_side), min(classes, max_side))
    width = max(len(t) for t in strata)
    values = np.stack([np.pad(s[t], (0, width - len(t)), mode="edge") for t in strata])
    cum = np.stack([np.pad(np.cumsum(w[t]) / w[t].sum(), (0, width - len(t)), constant_values=1.0)
                    for t in strata])
    i = np.arange(dim)[:, None]
    corners = np.clip(np.minimum(i, dim - s) - np.maximum(0, i - s + 1) + 1, 0, None)
    cover = (corners / (dim - s + 1.0)).mean(axis=1)
    tables = _AxisTables(values, cum, np.array([w[t].sum() for t in strata]),
                         np.concatenate((np.zeros((2, 1)), np.cumsum([cover, cover ** 2], axis=1)), axis=1))
    for a in (tables.values, tables.cum_weights, tables.stratum_weight, tables.cum_cover):
        a.flags.writeable = False
    return tables


def _axis_segments(rng: np.random.Generator, dim: int, tables: _AxisTables) -> Tuple[np.ndarray, np.ndarray]:
    """Split one axis into consecutive segments (the brick sides along this axis).

    One side per class is drawn for this patch (within its stratum, in proportion to the size-biased weight).
    Side ``c_k`` of class k is used for a share ``W_k / c_k`` of the segments (``W_k`` the stratum's weight):
    the expected count of each side, rounded at random, in random order, then cut at the border (extra i.i.d.
    segments if the counts fall short), the order reversed with probability 1/2. A voxel away from the borders
    then lies in a segment of side s with probability ``s / (dim - s + 1)`` normalised over 1..max, the
    official distribution of the side of the window that owns it.

    Returns:
        (starts, lengths), int64 arrays that tile [0, dim).
    """
    k = len(tables.stratum_weight)
    pick = (tables.cum_weights < rng.random(k)[:, None]).sum(axis=1)
    sides = tables.values[np.arange(k), np.minimum(pick, tables.values.shape[1] - 1)]
    share = tables.stratum_weight / sides
    share = share / share.sum()
    expected = dim * share / float((share * sides).sum())
    counts = np.floor(expected).astype(np.int64)
    counts += rng.random(k) < expected - counts
    lengths = rng.permutation(np.repeat(sides, counts))
    short = dim - int(lengths.sum())
    if short > 0:  # rounding fell short: append i.i.d. segments
        more = sides[np.minimum(np.searchsorted(np.cumsum(share), rng.random(short // int(sides.min()) + 1),
                                                side="right"), k - 1)]
        lengths = np.concatenate((lengths, more))
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, dim)) + 1
    lengths = lengths[:n].copy()
    lengths[-1] -= ends[n - 1] - dim
    if rng.random() < 0.5:
        lengths = lengths[::-1].copy()
    return np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths


@dataclass(frozen=True)
class BrickLayout:
    """The random brick partition of one patch (see :func:`local_pixel_shuffle`).

    Attributes:
        starts: per spatial axis, (n_a,) first voxel of each segment.
        lengths: per spatial axis, (n_a,) segment lengths; they tile the axis.
        selected: (n_x, n_y, n_z) bool, bricks whose voxels get shuffled (the others stay unchanged).
    """

    starts: Tuple[np.ndarray, np.ndarray, np.ndarray]
    lengths: Tuple[np.ndarray, np.ndarray, np.ndarray]
    selected: np.ndarray


def brick_layout(spatial_shape, rng: np.random.Generator, num_windows: int = 10_000,
                 max_window_fraction: float = 0.1, rounds: int = 64) -> BrickLayout:
    """Draw the brick partition and the shuffled bricks; the first draws of :func:`local_pixel_shuffle`.

    Calling it with a generator in the same state as the one given to :func:`local_pixel_shuffle` (same other
    arguments) gives the layout that call uses (the tests rely on this).

    Args:
        spatial_shape: (X, Y, Z).
        rng: random source.
        num_windows: official window count; sets the fraction of shuffled bricks.
        max_window_fraction: maximum window side / patch side.
        rounds: number of brick shapes per patch: ``round(rounds ** (1/3))`` side classes per axis.
    """
    dims = tuple(int(d) for d in spatial_shape)
    max_sides = max_window_sides(dims, max_window_fraction)
    classes = max(1, int(round(rounds ** (1.0 / 3.0))))
    # x sides do not multiply the cross-section shapes (pattern banks): every side is its own class along x
    tables = [_axis_tables(d, int(m), int(m) if a == 0 else classes) for a, (d, m) in enumerate(zip(dims, max_sides))]
    segs = [_axis_segments(rng, d, t) for d, t in zip(dims, tables)]
    # official coverage of a voxel: 1 - (1 - qx qy qz) ** num_windows, q per axis = probability that one
    # window covers it. A brick is shuffled with that probability averaged over its voxels, the average taken
    # with a two-point rule (mean +- sd of q over the brick): exact where q is constant, i.e. away from the
    # faces; near them q varies and the plain mean would overestimate the coverage
    mom = [(t.cum_cover[:, st + ln] - t.cum_cover[:, st]) / ln for t, (st, ln) in zip(tables, segs)]
    m1, m2 = (mom[0][i][:, None, None] * mom[1][i][None, :, None] * mom[2][i][None, None, :] for i in (0, 1))
    sd = np.sqrt(np.maximum(m2 - m1 * m1, 0.0))
    p = 1.0 - 0.5 * (np.exp(num_windows * np.log1p(-np.clip(m1 - sd, 0.0, 1.0 - 1e-12)))
                     + np.exp(num_windows * np.log1p(-np.minimum(m1 + sd, 1.0 - 1e-12))))
    selected = rng.random(p.shape) < p
    return BrickLayout(tuple(s for s, _ in segs), tuple(ln for _, ln in segs), selected)


def _ragged_permutations(rng: np.random.Generator, lengths: np.ndarray, width: int) -> np.ndarray:
    """One uniform random permutation of range(n) per n in ``lengths``, concatenated (one generator call).

    Each row of a (rows, width) array of uniform permutations of range(width) restricted to its entries below
    n (order kept) is a uniform permutation of range(n).
    """
    full = rng.permuted(np.broadcast_to(np.arange(width), (len(lengths), width)), axis=1)
    return full[full < np.asarray(lengths)[:, None]]


def _rotate_ragged(rng: np.random.Generator, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Compose each permutation in ``flat`` (rows of ``lengths``) with a random cyclic shift by 1..n-1.

    A uniform permutation composed with a fixed one is uniform again, and the partner never agrees with the
    original at any position (no common fixed point): pairs of them spread fixed points (unchanged voxels)
    evenly instead of letting a shared identity leave many voxels unchanged.
    """
    lengths = np.asarray(lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    shift = 1 + (rng.random(len(lengths)) * np.maximum(lengths - 1, 1)).astype(np.int64)
    row_start, row_len = np.repeat(starts, lengths), np.repeat(lengths, lengths)
    pos = np.arange(flat.size) - row_start + np.repeat(shift, lengths)
    return flat.take(row_start + pos % row_len)


def _padded(flat: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Rows of ``lengths`` concatenated in ``flat`` -> (rows, width) array, zero-padded on the right."""
    out = np.zeros((len(lengths), width), flat.dtype)
    out[np.arange(width)[None, :] < np.asarray(lengths)[:, None]] = flat
    return out


def _plane_patterns(rng: np.random.Generator, ly: np.ndarray, lz: np.ndarray, Z: int, bank_size: int,
                    x_offsets: int, row: int) -> Tuple[np.ndarray, np.ndarray]:
    """Bank of ``bank_size`` uniform random permutations per (Ly, Lz) brick cross-section.

    Half of them are drawn independently, the other half are those composed with a random non-zero cyclic
    shift (:func:`_rotate_ragged`). Entry u of a pattern (u = ly * Lz + lz, the destination in the cross-
    section) holds the flat offset from the destination to its source in the (Y, Z) plane plus ``k * row``
    with k uniform in 1..x_offsets (the x permutation, i.e. block of the slab buffer, its column uses; nothing
    when x_offsets is 0). Entries ``[0, max_area)`` are zeros: the identity (unshuffled bricks).

    Returns:
        (table, offset): int64 table; (n_y, n_z, bank_size) table offset of each pattern of each cross-section.
    """
    code = ly[:, None] * (Z + 1) + lz[None, :]
    codes, inv = np.unique(code, return_inverse=True)
    inv = inv.reshape(code.shape)
    cols = codes % (Z + 1)
    area = (codes // (Z + 1)) * cols
    identity = int(area.max())
    half = (bank_size + 1) // 2
    rows = np.repeat(area, half)  # first half: half patterns per shape, shape after shape
    first = _ragged_permutations(rng, rows, identity)
    second = _rotate_ragged(rng, first, rows)  # (one rotation too many per shape when bank_size is odd)
    src = np.concatenate((first, second))
    n_first = first.size
    dst = np.arange(n_first) - np.repeat(np.concatenate(([0], np.cumsum(rows)[:-1])), rows)
    dst = np.concatenate((dst, dst))
    c = np.repeat(np.repeat(cols, half), rows)
    c = np.concatenate((c, c))
    table = np.empty(identity + src.size, np.int64)
    table[:identity] = 0
    table[identity:] = (src // c - dst // c) * Z + (src % c - dst % c)
    if x_offsets:
        table[identity:] += rng.integers(1, x_offsets + 1, src.size) * row
    start = identity + np.concatenate(([0], np.cumsum(area * half)[:-1]))  # first pattern of each shape
    j = np.arange(bank_size)
    offset = start[:, None] + (j % half)[None, :] * area[:, None] + (j >= half)[None, :] * n_first
    return table, offset[inv]


@dataclass(frozen=True)
class ShuffleWindows:
    """The random draws of the official local pixel shuffle (``MrGiovanni/ModelsGenesis`` ``pytorch/utils.py``
    ``local_pixel_shuffling``), all taken up front.

    Attributes:
        sizes: (N, 3) int64 window sides, per axis uniform in [1, max(1, dim // 10)] (``randint(1, dim//10)``).
        starts: (N, 3) int64 window origins, per axis uniform in [0, dim - side] (``randint(0, dim - side)``).
        keys: (sum of window volumes,) float64 uniforms in [0, 1), window after window: the permutation of
            window i is the argsort of its keys (a uniform permutation, as ``np.random.shuffle``).
        offsets: (N + 1,) int64 start of each window's keys (cumulative window volumes).
    """

    sizes: np.ndarray
    starts: np.ndarray
    keys: np.ndarray
    offsets: np.ndarray


def draw_shuffle_windows(spatial_shape, rng: np.random.Generator, num_windows: int = 10_000,
                         max_window_fraction: float = 0.1) -> ShuffleWindows:
    """Draw the official process's windows and permutations (same distributions, drawn in bulk)."""
    dims = np.array([int(d) for d in spatial_shape], dtype=np.int64)
    max_sides = max_window_sides(dims, max_window_fraction)
    n = int(num_windows)
    sizes = rng.integers(1, max_sides + 1, size=(n, 3), dtype=np.int64)
    starts = np.floor(rng.random((n, 3)) * (dims - sizes + 1)).astype(np.int64)
    vols = sizes.prod(axis=1)
    offsets = np.concatenate(([0], np.cumsum(vols)))
    keys = rng.random(int(offsets[-1]))
    return ShuffleWindows(sizes, starts, keys, offsets)


def shuffle_windows_loop(x: np.ndarray, w: ShuffleWindows) -> np.ndarray:
    """Reference: the official loop on (C, X, Y, Z) ``x`` for the draws ``w`` (channels share windows).

    For each window in order: read its voxels from the *original* ``x``, flatten (C order), permute by the
    argsort of its keys, write into the output. Later windows overwrite earlier ones.
    """
    out = np.array(x, copy=True)
    for i in range(len(w.sizes)):
        (sx, sy, sz), (px, py, pz) = w.sizes[i].tolist(), w.starts[i].tolist()
        box = (slice(None), slice(px, px + sx), slice(py, py + sy), slice(pz, pz + sz))
        perm = np.argsort(w.keys[w.offsets[i]:w.offsets[i + 1]])
        out[box] = x[box].reshape(x.shape[0], -1)[:, perm].reshape(x.shape[0], sx, sy, sz)
    return out


def shuffle_windows(x: np.ndarray, w: ShuffleWindows) -> np.ndarray:
    """Vectorised :func:`shuffle_windows_loop`: the same output for the same draws, without a per-window loop.

    Windows are processed in groups of equal shape (at most ``prod(max sides)`` groups, e.g. 1,728 for 128³,
    against 10,000 windows): per group, a (k, n) array of destination voxels (element l of each window, C order:
    window origin + a fixed offset pattern) and one row-wise argsort of the (k, n) keys (the same sort the loop
    runs per window, hence the same permutations); element l of a window receives the voxel at its position
    ``perm[l]``. A voxel ends up with the value written by the last window covering it (largest window index,
    ``np.maximum.at``); exactly those entries are copied from ``x``.

    Measured (``benchmarks/bench_model_genesis.py``, numpy 2.4, one core): about 1.5-2x *slower* than the
    loop at 128³ (the loop's ~30 µs per window are cheaper than materialising ~2.7 M (window, voxel) entries),
    so :func:`local_pixel_shuffle_windows` runs the loop; this version is the cross-check.

    Args:
        x: (C, X, Y, Z) array.
        w: draws from :func:`draw_shuffle_windows` for ``x.shape[1:]``.

    Returns:
        new array like ``x``.
    """
    x = np.ascontiguousarray(x)
    C, X, Y, Z = x.shape
    out = x.copy()
    total = int(w.offsets[-1])
    if total == 0:
        return out
    itype = np.int32 if X * Y * Z < 2 ** 31 and len(w.sizes) < 2 ** 31 else np.int64
    code = (w.sizes[:, 0] * (Y + 1) + w.sizes[:, 1]) * (Z + 1) + w.sizes[:, 2]
    by_shape = np.argsort(code, kind="stable")
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(code[by_shape])) + 1, [len(code)]))
    base = ((w.starts[:, 0] * Y + w.starts[:, 1]) * Z + w.starts[:, 2]).astype(itype)
    dest, source, win = (np.empty(total, itype) for _ in range(3))
    pos = 0
    for g in range(len(bounds) - 1):
        idx = by_shape[bounds[g]:bounds[g + 1]]
        sx, sy, sz = w.sizes[idx[0]].tolist()
        pattern = ((np.arange(sx, dtype=itype)[:, None, None] * Y + np.arange(sy, dtype=itype)[None, :, None]) * Z
                   + np.arange(sz, dtype=itype)[None, None, :]).ravel()
        n, k = pattern.size, len(idx)
        d = (base[idx][:, None] + pattern[None, :]).ravel()
        perm = np.argsort(w.keys[w.offsets[idx][:, None] + np.arange(n)[None, :]], axis=1)
        perm += (np.arange(k) * n)[:, None]
        dest[pos:pos + k * n] = d
        source[pos:pos + k * n] = d[perm.ravel()]
        win[pos:pos + k * n] = np.repeat(idx.astype(itype), n)
        pos += k * n
    last = np.full(X * Y * Z, -1, dtype=itype)
    np.maximum.at(last, dest, win)
    keep = win == last[dest]  # a window never repeats a voxel: one entry per covered voxel
    flat_in, flat_out = x.reshape(C, -1), out.reshape(C, -1)
    flat_out[:, dest[keep]] = flat_in[:, source[keep]]
    return out


def local_pixel_shuffle_windows(x: np.ndarray, rng: np.random.Generator, num_windows: int = 10_000,
                                max_window_fraction: float = 0.1) -> np.ndarray:
    """The official local pixel shuffle (faithful default): :func:`draw_shuffle_windows` + :func:`shuffle_windows_loop`
    (measured faster than the vectorised :func:`shuffle_windows`, which gives the identical result).

    Args:
        x: (C, X, Y, Z) array; all channels share windows and permutations (the official code shuffles its
            single channel).
        rng: random source.
        num_windows: official 10,000.
        max_window_fraction: official 0.1 (``dim // 10``).
    """
    return shuffle_windows_loop(x, draw_shuffle_windows(x.shape[1:], rng, num_windows, max_window_fraction))


def local_pixel_shuffle(x: np.ndarray, rng: np.random.Generator, num_windows: int = 10_000,
                        max_window_fraction: float = 0.1, rounds: int = 64, bank_size: int = 16,
                        x_perms: int = SHUFFLE_X_PERMS) -> np.ndarray:
    """Shuffle voxels inside many small boxes (Models Genesis local pixel shuffling, fast version).

    Official process (``MrGiovanni/ModelsGenesis`` ``local_pixel_shuffling``): ``num_windows`` windows, each
    with sides uniform in [1, dim//10] at a uniform random position; its voxels are read from the *original*
    patch, permuted uniformly and written to the output, later windows overwriting earlier ones. A Python loop
    of 10,000 iterations; kept as the reference in ``benchmarks/bench_model_genesis.py``.

    This version never draws the 10,000 windows: it builds, per patch, what a voxel sees at the end of that
    process. Each axis is cut into consecutive segments (:func:`brick_layout`), so the patch is a grid of boxes
    ("bricks"). The segment sides are drawn such that the brick containing an interior voxel has, per axis and
    independently, the official distribution of the sides of the window that *owns* the voxel (the last one
    covering it: side s with probability proportional to ``s / (dim - s + 1)``). Each brick is shuffled with
    the official probability that a voxel of it is covered by at least one window (``1 - (1 - q) ** N``, q the
    probability that one window covers it, averaged over the brick per axis), else left unchanged. A shuffled
    brick gets a permutation of its own voxels, read from the original patch, with this structure: its x
    columns (fixed y, z) are moved as wholes by a uniform random permutation of its (y, z) cross-section
    (one of ``bank_size`` drawn per cross-section shape and patch), and the order inside each column is one of
    ``x_perms`` random permutations of the slab's x side (drawn per x slab of bricks, picked per column).
    Per voxel that gives exactly the official source distribution: source uniform over the brick,
    independently per axis. Permutations are drawn in pairs, a uniform one and its composition with a random
    non-zero cyclic shift (also uniform, but never sharing a fixed point with its partner), so that shared
    permutations do not leave whole groups of columns unchanged. The work is one (Y, Z) gather index per x
    slab, ``x_perms + 1`` row copies of the patch and, per slab, one 2-D gather with that index shared by all
    its rows: no per-window or per-voxel Python.

    Matched (tested against the loop): fraction of changed voxels, per-axis distribution of
    |source - destination|, every shuffled box holds a permutation of its original values, locality
    (|displacement| < max side per axis), value range, channels never mix, no global RNG state.
    Differs, on purpose:

    * windows never overlap, so none is overwritten: the output is a permutation of the patch (in the official
      process about 17 % of the voxels of a 128³ patch repeat a value shown elsewhere, because the visible
      part of a window receives values from its parts that later windows cover), and shuffled regions are
      whole boxes on a grid (official: boxes minus later boxes, at arbitrary positions);
    * the permutation of a box is structured (columns move as wholes; ``x_perms`` x orders per slab; cross
      section patterns reused from a bank), not uniform over all permutations of the box;
    * the patch-to-patch spread of the changed fraction and of the mean displacement is larger (one side per
      class and axis per patch), and the changed fraction falls off less steeply at the patch faces (coverage
      is matched per brick, not per voxel);
    * window sides are drawn per patch from ``round(rounds ** (1/3))`` classes per axis (strata of 1..max).

    Args:
        x: (C, X, Y, Z) array, any range and dtype. All channels share bricks and permutations.
        rng: random source.
        num_windows: number of official windows the result stands for (official 10,000).
        max_window_fraction: maximum window side / patch side (official 0.1 = ``dim // 10``).
        rounds: brick shapes per patch (ours, 64: 4 side classes per axis).
        bank_size: permutations drawn per cross-section shape (ours, 16).
        x_perms: x permutations per slab (ours, 2).

    Returns:
        new (C, X, Y, Z) array of ``x``'s dtype.
    """
    x = np.ascontiguousarray(x)
    C, X, Y, Z = x.shape
    max_sides = max_window_sides((X, Y, Z), max_window_fraction)
    if num_windows <= 0 or int(max_sides.prod()) == 1:
        return x.copy()  # 1-voxel windows cannot change anything
    lay = brick_layout((X, Y, Z), rng, num_windows, max_window_fraction, rounds)
    (sx, sy, sz), (lx, ly, lz), sel = lay.starts, lay.lengths, lay.selected
    YZ = Y * Z
    K = int(x_perms) if max_sides[0] > 1 else 0  # slabs of one row have nothing to permute along x
    table, offset = _plane_patterns(rng, ly, lz, Z, int(bank_size), K, YZ)
    pattern = np.take_along_axis(offset[None], rng.integers(0, bank_size, sel.shape + (1,)), axis=3)[..., 0]
    pattern *= sel  # 0 = identity
    by = np.repeat(np.arange(len(ly)), ly)  # brick index of each y
    bz = np.repeat(np.arange(len(lz)), lz)
    local = ((np.arange(Y) - np.repeat(sy, ly))[:, None] * lz[bz][None, :]
             + (np.arange(Z) - np.repeat(sz, lz))[None, :])
    idx = pattern.take(bz, axis=2).take(by, axis=1)  # (n_x, Y, Z): table offset of each voxel's pattern
    idx += local
    idx = table.take(idx)  # source offset within the slab buffer row
    idx += np.arange(YZ).reshape(Y, Z)
    idx = idx.reshape(len(lx), YZ)
    flat = x.reshape(C, X, YZ)
    out = np.empty_like(flat)
    if K:
        # per slab, K random orders of its rows: x row orders[l, k] goes to block k of buffer row l (k = 0: row l);
        # orders come in pairs, a random order and its composition with a random non-zero cyclic shift
        amax, n = int(lx.max()), len(lx)
        half = (K + 1) // 2
        rows = np.repeat(lx, half)
        first = _ragged_permutations(rng, rows, amax)
        perms = np.concatenate((_padded(first, rows, amax), _padded(_rotate_ragged(rng, first, rows), rows, amax)))
        perms = perms.reshape(2, n, half, amax).transpose(1, 3, 0, 2).reshape(n, amax, 2 * half)[:, :, :K]
        orders = np.concatenate((np.broadcast_to(np.arange(amax)[None, :, None], (n, amax, 1)), perms), axis=2)
        orders += sx[:, None, None]
        buf = np.empty((amax, (K + 1) * YZ), x.dtype)
    for s, (x0, a) in enumerate(zip(sx.tolist(), lx.tolist())):
        if K:
            # buffer row l = [x row l | x row sigma_1(l) | ... | x row sigma_K(l)] of this slab
            src = buf[:a]
            for c in range(C):
                flat[c].take(orders[s, :a].ravel(), axis=0, mode="clip", out=src.reshape(a * (K + 1), YZ))
                src.take(idx[s], axis=1, mode="clip", out=out[c, x0:x0 + a])  # indices valid by construction
        else:
            for c in range(C):
                flat[c, x0:x0 + a].take(idx[s], axis=1, mode="clip", out=out[c, x0:x0 + a])
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------
# 3. non-linear intensity transform
# ----------------------------------------------------------------------------------------------------------
def bezier_curve(points: np.ndarray, num_points: int = 100_000) -> Tuple[np.ndarray, np.ndarray]:
    """Cubic Bézier curve through control ``points`` (4, 2), sampled at ``num_points`` parameters.

    Same parametrisation as the official ``bezier_curve``/``bernstein_poly``: point i has weight
    ``comb(3, i) t^(3-i) (1-t)^i``, so the curve runs from the last control point (t=0) to the first (t=1).

    Returns:
        (xvals, yvals), each (num_points,) float64.
    """
    n = len(points) - 1
    t = np.linspace(0.0, 1.0, num_points)
    basis = np.stack([math.comb(n, i) * t ** (n - i) * (1 - t) ** i for i in range(n + 1)])
    return points[:, 0] @ basis, points[:, 1] @ basis


def random_intensity_curve(rng: np.random.Generator, num_points: int = 100_000
                           ) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Draw the official random intensity curve.

    Control points (0,0), (r,r), (r,r), (1,1) with r ~ U[0,1); with probability 0.5 only the x values are
    sorted (official "flip": the curve then maps increasing inputs to roughly decreasing outputs, i.e. it
    inverts intensities), else both are sorted (monotone increasing map).

    Returns:
        (xs, ys, inverted): knots of a piecewise-linear map [0, 1] -> [0, 1]; ``xs`` ascending.
    """
    points = np.array([[0.0, 0.0], [rng.random(), rng.random()], [rng.random(), rng.random()], [1.0, 1.0]])
    xvals, yvals = bezier_curve(points, num_points)
    inverted = bool(rng.random() < 0.5)
    if inverted:
        return np.sort(xvals), yvals, True
    return np.sort(xvals), np.sort(yvals), False


def apply_intensity_curve(x01: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``np.interp(x01, xs, ys)`` computed through a uniform lookup table of ``len(xs)`` entries.

    The table is ``np.interp`` on a uniform grid of [0, 1] with the same number of knots as the curve
    (100,000 by default), then each voxel is linearly interpolated in it: O(1) per voxel instead of a
    binary search (about 10x faster on 128³; differences to ``np.interp`` below 1e-6 in the tests). Values
    outside [0, 1] are clamped, as ``np.interp`` clamps to the end knots.

    Args:
        x01: array with values in [0, 1].

    Returns:
        float32 array of the same shape with values in [min(ys), max(ys)] ⊂ [0, 1].
    """
    n = len(xs)
    lut = np.interp(np.linspace(0.0, 1.0, n), xs, ys).astype(np.float32)
    pos = np.clip(x01.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(n - 1)
    i0 = np.minimum(pos.astype(np.int64), n - 2)
    frac = np.subtract(pos, i0, dtype=np.float32)
    lo = lut.take(i0)
    return lo + (lut.take(i0 + 1) - lo) * frac


def nonlinear_intensity(x01: np.ndarray, rng: np.random.Generator, num_points: int = 100_000
                        ) -> Tuple[np.ndarray, bool]:
    """Apply a random official Bézier intensity curve to ``x01`` (values in [0, 1]).

    Returns:
        (transformed float32 array in [0, 1], inverted flag).
    """
    xs, ys, inverted = random_intensity_curve(rng, num_points)
    return apply_intensity_curve(x01, xs, ys), inverted


# ----------------------------------------------------------------------------------------------------------
# 4. painting
# ----------------------------------------------------------------------------------------------------------
def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive (Python ``random.randint``)."""
    return int(rng.integers(lo, hi, endpoint=True))


def _box_start(rng: np.random.Generator, dim: int, size: int, margin: int = 3) -> int:
    """Official ``randint(3, dim - size - 3)``; without the margin when the patch is too small for it."""
    if dim - size - margin >= margin:
        return _randint(rng, margin, dim - size - margin)
    return _randint(rng, 0, max(0, dim - size))


def _inpaint_box(rng: np.random.Generator, shape) -> Tuple[slice, ...]:
    sizes = []
    for d in shape:
        lo = max(1, d // 6)
        sizes.append(min(d, _randint(rng, lo, max(lo, d // 3))))
    return tuple(slice(s0, s0 + s) for s0, s in ((_box_start(rng, d, s), s) for d, s in zip(shape, sizes)))


def _outpaint_box(rng: np.random.Generator, shape) -> Tuple[slice, ...]:
    sizes = [min(d, max(1, d - _randint(rng, 3 * d // 7, 4 * d // 7))) for d in shape]
    return tuple(slice(s0, s0 + s) for s0, s in ((_box_start(rng, d, s), s) for d, s in zip(shape, sizes)))


def in_painting(x01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Official in-painting: up to 5 boxes (each added while ``random < 0.95``) filled with U[0,1) noise.

    Box sides are uniform in [dim//6, dim//3] with a 3-voxel margin to the border; the noise is shared by
    all channels (the official code broadcasts one (sx, sy, sz) noise block over the channel axis).

    Args:
        x01: (C, X, Y, Z) values in [0, 1].

    Returns:
        new float32 array in [0, 1].
    """
    out = np.array(x01, dtype=np.float32, copy=True)
    cnt = 5
    while cnt > 0 and rng.random() < 0.95:
        box = _inpaint_box(rng, out.shape[1:])
        out[(slice(None),) + box] = rng.random(tuple(s.stop - s.start for s in box), dtype=np.float32)
        cnt -= 1
    return out


def out_painting(x01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Official out-painting: U[0,1) noise everywhere except one kept box plus up to 4 more (p 0.95 each).

    Kept box sides are ``dim - randint(3*dim//7, 4*dim//7)`` with a 3-voxel margin; the kept voxels are copied
    from ``x01``; the noise is drawn per channel (the official code draws it for the full (C, X, Y, Z) array).

    Args:
        x01: (C, X, Y, Z) values in [0, 1].

    Returns:
        new float32 array in [0, 1].
    """
    out = rng.random(x01.shape, dtype=np.float32)
    box = (slice(None),) + _outpaint_box(rng, x01.shape[1:])
    out[box] = x01[box]
    cnt = 4
    while cnt > 0 and rng.random() < 0.95:
        box = (slice(None),) + _outpaint_box(rng, x01.shape[1:])
        out[box] = x01[box]
        cnt -= 1
    return out


# ----------------------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------------------
def unit_range(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, scale) of (C, X, Y, Z) ``x`` so that ``(x - lo) / scale`` spans [0, 1].

    Returns:
        lo, scale: (C, 1, 1, 1) float32; a constant channel gets scale 1 (its paint noise then spans
        [lo, lo + 1) in the original units).
    """
    lo = x.min(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    hi = x.max(axis=(1, 2, 3), keepdims=True).astype(np.float32)
    scale = np.where(hi > lo, hi - lo, np.float32(1.0)).astype(np.float32)
    return lo, scale


MG_FLAGS = ("flips", "local_shuffle", "nonlinear", "inverted", "inpaint", "outpaint")


def model_genesis_pair(x: np.ndarray, rng: np.random.Generator, config: ModelGenesisConfig = ModelGenesisConfig()
                       ) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Corrupt one patch the Models Genesis way (see module docstring for the order and rates).

    Args:
        x: (C, X, Y, Z) float patch, any range (z-scored in nnpre).
        rng: random source.
        config: rates and sizes.

    Returns:
        (input, target, applied): float32 (C, X, Y, Z) corrupted input and flipped clean target, both in the
        range of ``x`` (per-patch mapping: input values stay within [min, max] of ``x`` per channel, or those
        of the window with ``intensity_window``, except unchanged voxels), and a dict with the number of flip
        draws (channel no-ops included) and 0/1 flags for each corruption (keys :data:`MG_FLAGS`).
    """
    cfg = config
    applied = dict.fromkeys(MG_FLAGS, 0)
    axes = random_flip_axes(rng, cfg.flip_rate, cfg.max_flips, tuple(cfg.flip_choices))
    applied["flips"] = len(axes)
    target = apply_flips(np.asarray(x, dtype=np.float32), axes)
    inp = target
    if rng.random() < cfg.local_rate:
        if cfg.local_shuffle == "windows":
            inp = local_pixel_shuffle_windows(inp, rng, cfg.num_windows, cfg.max_window_fraction)
        else:
            inp = local_pixel_shuffle(inp, rng, cfg.num_windows, cfg.max_window_fraction, cfg.shuffle_rounds,
                                      cfg.shuffle_bank_size)
        applied["local_shuffle"] = 1
    if cfg.intensity_window is None:
        lo, scale = unit_range(target)
    else:
        w0, w1 = (float(v) for v in cfg.intensity_window)
        lo = np.full((target.shape[0], 1, 1, 1), w0, np.float32)
        scale = np.full((target.shape[0], 1, 1, 1), w1 - w0, np.float32)
    u: Optional[np.ndarray] = None  # patch in [0, 1], built only if an intensity step runs
    if rng.random() < cfg.nonlinear_rate:
        u, inverted = nonlinear_intensity((inp - lo) / scale, rng, cfg.bezier_points)
        applied["nonlinear"], applied["inverted"] = 1, int(inverted)
    if rng.random() < cfg.paint_rate:
        u = (inp - lo) / scale if u is None else u
        if rng.random() < cfg.inpaint_rate:
            u, applied["inpaint"] = in_painting(u, rng), 1
        else:
            u, applied["outpaint"] = out_painting(u, rng), 1
    if u is not None:
        inp = np.clip(u, 0.0, 1.0) * scale + lo
    if inp is target:
        inp = target.copy()
    return inp.astype(np.float32, copy=False), target, applied


@register_pretext("model_genesis")
class ModelGenesisTask(PretextTask):
    """Models Genesis restoration pretext (see module docstring).

    Input range: any real values (z-scored patches); corruption is per sample on CPU in numpy. Output: one
    channel per input channel; target = flipped clean patch; loss = whole-volume MSE (``loss_mask`` None).
    ``extras`` holds per-sample (B,) long tensors ``mg_<flag>`` for each of :data:`MG_FLAGS`.
    """

    config_class = ModelGenesisConfig

    def loader_augmentation(self) -> str:
        return "none"  # the official pipeline's only augmentation is its own flip step (inside corrupt)

    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        check_image(image, self.name)
        rng = numpy_rng(generator)
        arr = image.detach().to("cpu", torch.float32).numpy()
        inputs, targets, flags = [], [], {k: [] for k in MG_FLAGS}
        for b in range(arr.shape[0]):
            inp, tgt, applied = model_genesis_pair(arr[b], rng, self.config)
            inputs.append(inp)
            targets.append(tgt)
            for k in MG_FLAGS:
                flags[k].append(applied[k])
        to_t = lambda a: torch.from_numpy(np.stack(a)).to(image.device)  # noqa: E731
        extras = {f"mg_{k}": torch.tensor(v, dtype=torch.long) for k, v in flags.items()}
        return PretextSample(input=to_t(inputs), target=to_t(targets), loss_mask=None, extras=extras)

    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """input = target (the clean flipped patch), corrupted, prediction, target."""
        return {"input": _vol(sample.target), "corrupted": _vol(sample.input), "prediction": _vol(prediction),
                "target": _vol(sample.target)}

"""Benchmark: Models Genesis local pixel shuffling, faithful window process vs the brick approximation, 128³.

The faithful default (``local_shuffle="windows"``) is the official 10,000-window process
(``local_pixel_shuffle_windows``: bulk draws + a per-window loop; ``shuffle_windows`` is its vectorised twin,
identical output, timed here as well). The opt-in ``local_shuffle="bricks"`` (``local_pixel_shuffle``, brick
partition, see its docstring) is an approximation that must be at least 20x faster than the official loop;
this script prints how its statistics differ from the official process, including a joint statistic
(x-neighbours moved by the same (y, z) displacement: bricks move whole x columns).

References measured in the same run (single thread), each as "reference time / our time":

* ``loop_official``: the official algorithm (``MrGiovanni/ModelsGenesis`` ``local_pixel_shuffling``):
  10,000 windows in a Python loop, window sides ``randint(1, dim // 10)``, voxels read from the original,
  ``np.random.shuffle`` per window, later windows overwrite. Scalar draws use a local ``random.Random`` (as
  fast as the official module-level ``random``) and a local ``numpy.random.Generator``: no global state.
  Target: ratio >= 20 (PASS/FAIL printed).
* ``loop_torch``: the same loop written against our API (torch tensors, ``torch.Generator``).

Also prints the statistics both produce (fraction of changed voxels, mean |source - destination| per axis,
fraction of voxels repeating a value shown elsewhere), the Bézier lookup table vs ``np.interp`` ratio and the
share of one full Models Genesis pair (every corruption on) spent in the local shuffle. Only ratios and
statistics are printed, never absolute times (the machine may be shared).

Run: ``python benchmarks/bench_model_genesis.py [--size 128] [--repeats 7] [--quick]``
(``--quick``: 3 repeats, one statistics sample, no torch loop).
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from nnpre_trainers.pretext.model_genesis import (
    ModelGenesisConfig,
    apply_intensity_curve,
    draw_shuffle_windows,
    local_pixel_shuffle,
    local_pixel_shuffle_windows,
    model_genesis_pair,
    random_intensity_curve,
    shuffle_windows,
    shuffle_windows_loop,
)

TARGET_RATIO = 20.0


def local_pixel_shuffle_loop(x: np.ndarray, rng: np.random.Generator, num_windows: int = 10_000,
                             max_window_fraction: float = 0.1) -> np.ndarray:
    """Reference: the official per-window loop on a (C, X, Y, Z) array (channels share windows).

    Window sides are uniform in [1, max(1, floor(dim * fraction))], positions uniform over the valid ones;
    each window's voxels (read from ``x``) are shuffled uniformly and written to the output in order.
    """
    py = random.Random(int(rng.integers(2 ** 63)))
    out = x.copy()
    _, X, Y, Z = x.shape
    mx, my, mz = (max(1, int(np.floor(d * max_window_fraction + 1e-9))) for d in (X, Y, Z))
    for _ in range(num_windows):
        sx, sy, sz = py.randint(1, mx), py.randint(1, my), py.randint(1, mz)
        px, py_, pz = py.randint(0, X - sx), py.randint(0, Y - sy), py.randint(0, Z - sz)
        sl = (slice(None), slice(px, px + sx), slice(py_, py_ + sy), slice(pz, pz + sz))
        if x.shape[0] == 1:  # the official case: flatten, shuffle in place, write back
            window = x[sl].flatten()
            rng.shuffle(window)
            out[sl] = window.reshape(1, sx, sy, sz)
        else:
            window = x[sl].reshape(x.shape[0], -1)
            out[sl] = window[:, rng.permutation(window.shape[1])].reshape(x.shape[0], sx, sy, sz)
    return out


def local_pixel_shuffle_loop_torch(x: torch.Tensor, generator: torch.Generator, num_windows: int = 10_000,
                                   max_window_fraction: float = 0.1) -> torch.Tensor:
    """Reference: the same loop with torch tensors (C, X, Y, Z) and a ``torch.Generator``."""
    out = x.clone()
    _, X, Y, Z = x.shape
    dims = (X, Y, Z)
    maxs = [max(1, int(np.floor(d * max_window_fraction + 1e-9))) for d in dims]
    for _ in range(num_windows):
        s = [int(torch.randint(1, m + 1, (1,), generator=generator)) for m in maxs]
        p = [int(torch.randint(0, d - si + 1, (1,), generator=generator)) for d, si in zip(dims, s)]
        sl = (slice(None), slice(p[0], p[0] + s[0]), slice(p[1], p[1] + s[1]), slice(p[2], p[2] + s[2]))
        window = x[sl].reshape(x.shape[0], -1)
        out[sl] = window[:, torch.randperm(window.shape[1], generator=generator)].view(x.shape[0], *s)
    return out


def source_index(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Flat index of the voxel of ``x`` each voxel of ``out`` was read from (``x`` needs unique values)."""
    flat = x.reshape(-1)
    order = np.argsort(flat)
    return order[np.searchsorted(flat[order], out.reshape(-1))]


def displacements(x: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(changed (N,) bool, |source - destination| (3, N) per spatial axis) for a single-channel ``x``."""
    src = source_index(x, out)
    shape = x.shape[1:]
    d = np.abs(np.stack(np.unravel_index(src, shape)) - np.stack(np.unravel_index(np.arange(src.size), shape)))
    return src != np.arange(src.size), d


def shuffle_statistics(x: np.ndarray, out: np.ndarray) -> tuple[float, np.ndarray]:
    """(fraction of changed voxels, mean |source - destination| per axis over changed voxels).

    Needs ``x`` with unique values (each value identifies its source voxel).
    """
    changed, d = displacements(x, out)
    return float(changed.mean()), d[:, changed].mean(axis=1)


def repeated_fraction(x: np.ndarray, out: np.ndarray) -> float:
    """Fraction of output voxels whose value is also shown by another output voxel (beyond its first copy)."""
    src = source_index(x, out)
    return 1.0 - np.unique(src).size / src.size


def same_yz_move_fraction(x: np.ndarray, out: np.ndarray) -> float:
    """Among x-adjacent voxel pairs that both changed, the fraction whose sources differ by exactly (1, 0, 0)
    in (y, z) terms, i.e. the two voxels were moved by the same (dy, dz) (a whole x column moved together)."""
    shape = x.shape[1:]
    src = np.stack(np.unravel_index(source_index(x, out), shape)).reshape(3, *shape)
    dst = np.stack(np.indices(shape))
    d = src - dst
    changed = (d != 0).any(axis=0)
    both = changed[:-1] & changed[1:]
    same = (d[1:, :-1] == d[1:, 1:]).all(axis=0)
    return float(same[both].mean())


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time(fn, repeats: int) -> float:
    """Median of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repeats, one statistics sample, no torch loop")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(1)
    n = args.size
    rng = np.random.default_rng(0)
    x = rng.permutation(n ** 3).astype(np.float32).reshape(1, n, n, n)  # unique values for the statistics

    # interleave ours and the loop so that load changes on a shared machine hit both alike
    t_vec, t_loop = [], []
    local_pixel_shuffle(x, rng)
    local_pixel_shuffle_loop(x, rng)
    for _ in range(repeats):
        t_vec.append(_time(lambda: local_pixel_shuffle(x, rng), 3))
        t_loop.append(_once(lambda: local_pixel_shuffle_loop(x, rng)))
    t_vec, t_loop = float(np.median(t_vec)), float(np.median(t_loop))
    ratio = t_loop / t_vec
    print(f"local pixel shuffle, {n}^3 patch, 10,000 windows, 1 thread (median of {repeats} interleaved runs)")
    print(f"  loop_official / ours  {ratio:6.1f}x   target >= {TARGET_RATIO:.0f}x: "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    if not args.quick:
        xt = torch.from_numpy(x.copy())
        gen = torch.Generator().manual_seed(0)
        t_torch = _time(lambda: local_pixel_shuffle_loop_torch(xt, gen), 1)
        print(f"  loop_torch / ours     {t_torch / t_vec:6.1f}x")

    w = draw_shuffle_windows(x.shape[1:], rng)
    t_wloop = _time(lambda: shuffle_windows_loop(x, w), max(1, repeats // 2))
    t_wvec = _time(lambda: shuffle_windows(x, w), max(1, repeats // 2))
    t_draw = _time(lambda: draw_shuffle_windows(x.shape[1:], rng), repeats)
    print(f"  faithful windows (default): draws + loop = {(t_draw + t_wloop) / t_vec:.1f}x bricks; vectorised twin "
          f"(identical output) / loop = {t_wvec / t_wloop:.2f}x")

    samples = 1 if args.quick else 3
    for name, fn in (("bricks", local_pixel_shuffle), ("windows", local_pixel_shuffle_windows),
                     ("loop_official", local_pixel_shuffle_loop)):
        outs = [fn(x, rng) for _ in range(samples)]
        st = [shuffle_statistics(x, o) for o in outs]
        fr = np.array([s[0] for s in st])
        disp = np.mean([s[1] for s in st], axis=0)
        rep = np.mean([repeated_fraction(x, o) for o in outs])
        col = np.mean([same_yz_move_fraction(x, o) for o in outs])
        print(f"  {name:13s} changed {fr.mean():.4f} ± {fr.std():.4f}   mean |displacement| (x,y,z) "
              f"{np.array2string(disp, precision=3)}   repeated values {rep:.3f}   x-neighbours same (dy,dz) "
              f"{col:.3f}")

    u = rng.random((1, n, n, n), dtype=np.float32)
    xs, ys, _ = random_intensity_curve(rng)
    t_lut = _time(lambda: apply_intensity_curve(u, xs, ys), repeats)
    t_interp = _time(lambda: np.interp(u, xs, ys), 1)
    print(f"Bezier intensity map, {n}^3: np.interp / lookup table {t_interp / t_lut:.1f}x")
    z = rng.standard_normal((1, n, n, n)).astype(np.float32)
    cfg = ModelGenesisConfig(local_rate=1.0, nonlinear_rate=1.0, paint_rate=1.0)
    t_pair = _time(lambda: model_genesis_pair(z, rng, cfg), repeats)
    t_shuf = _time(lambda: local_pixel_shuffle_windows(z, rng), repeats)
    print(f"one Models Genesis pair with every corruption on, {n}^3 (faithful windows): local shuffle is "
          f"{t_shuf / t_pair:.0%} of it")


if __name__ == "__main__":
    main()

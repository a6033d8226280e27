"""Benchmark: vectorised Models Genesis local pixel shuffling vs straightforward loops, on a 128³ patch.

References measured in the same run (single thread):

* ``loop_official``: the official algorithm (``MrGiovanni/ModelsGenesis`` ``local_pixel_shuffling``):
  10,000 windows in a Python loop, window sides ``randint(1, dim // 10)``, voxels read from the original,
  ``np.random.shuffle`` per window, later windows overwrite. Scalar draws use a local ``random.Random`` (as
  fast as the official module-level ``random``) and a local ``numpy.random.Generator``: no global state.
* ``loop_torch``: the same loop written against our API (torch tensors, ``torch.Generator``).

Also prints the statistics both produce (fraction of changed voxels, mean source displacement per axis) and
times the Bézier lookup table against ``np.interp`` and one full Models Genesis pair.

Run: ``python benchmarks/bench_model_genesis.py [--size 128] [--repeats 5]``
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from nnpre_trainers.pretext.model_genesis import (ModelGenesisConfig, apply_intensity_curve, local_pixel_shuffle,
                                                  model_genesis_pair, random_intensity_curve)


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


def shuffle_statistics(x: np.ndarray, out: np.ndarray) -> tuple[float, np.ndarray]:
    """(fraction of changed voxels, mean |source - destination| per axis over changed voxels).

    Needs ``x`` with unique values (each value identifies its source voxel).
    """
    flat, res = x.reshape(-1), out.reshape(-1)
    order = np.argsort(flat)
    src = order[np.searchsorted(flat[order], res)]
    changed = src != np.arange(flat.size)
    shape = x.shape[1:]
    d = np.abs(np.stack(np.unravel_index(src, shape)) - np.stack(np.unravel_index(np.arange(flat.size), shape)))
    return float(changed.mean()), d[:, changed].mean(axis=1)


def _time(fn, repeats: int) -> float:
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
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.size
    rng = np.random.default_rng(0)
    x = rng.permutation(n ** 3).astype(np.float32).reshape(1, n, n, n)  # unique values for the statistics
    xt = torch.from_numpy(x.copy())
    gen = torch.Generator().manual_seed(0)

    reps_loop = max(1, args.repeats // 2)
    t_vec = _time(lambda: local_pixel_shuffle(x, rng), args.repeats)
    t_loop = _time(lambda: local_pixel_shuffle_loop(x, rng), reps_loop)
    t_torch = _time(lambda: local_pixel_shuffle_loop_torch(xt, gen), reps_loop)
    print(f"local pixel shuffle, {n}^3 patch, 10,000 windows, 1 thread (median)")
    print(f"  vectorised (ours)        {t_vec * 1e3:9.1f} ms")
    print(f"  loop_official (numpy)    {t_loop * 1e3:9.1f} ms   ratio {t_loop / t_vec:5.1f}x")
    print(f"  loop_torch (our API)     {t_torch * 1e3:9.1f} ms   ratio {t_torch / t_vec:5.1f}x")
    print(f"  lower bound: one sequential take+put of the ~{int(10_000 * ((n // 10 + 1) / 2) ** 3):,} window voxels "
          f"{_floor(x, rng) * 1e3:.1f} ms")

    stats = {"vectorised": [], "loop_official": []}
    for _ in range(3):
        stats["vectorised"].append(shuffle_statistics(x, local_pixel_shuffle(x, rng)))
        stats["loop_official"].append(shuffle_statistics(x, local_pixel_shuffle_loop(x, rng)))
    for k, v in stats.items():
        fr = np.array([s[0] for s in v])
        disp = np.mean([s[1] for s in v], axis=0)
        print(f"  {k:15s} changed {fr.mean():.4f} ± {fr.std():.4f}   mean |displacement| (x,y,z) "
              f"{np.array2string(disp, precision=3)}")

    u = rng.random((1, n, n, n), dtype=np.float32)
    xs, ys, _ = random_intensity_curve(rng)
    t_lut = _time(lambda: apply_intensity_curve(u, xs, ys), args.repeats)
    t_interp = _time(lambda: np.interp(u, xs, ys), reps_loop)
    print(f"Bezier intensity map, {n}^3: lookup table {t_lut * 1e3:.1f} ms, np.interp {t_interp * 1e3:.1f} ms "
          f"(ratio {t_interp / t_lut:.1f}x)")
    z = rng.standard_normal((1, n, n, n)).astype(np.float32)
    t_pair = _time(lambda: model_genesis_pair(z, rng, ModelGenesisConfig(local_rate=1.0, nonlinear_rate=1.0,
                                                                         paint_rate=1.0)), reps_loop)
    print(f"one Models Genesis pair with every corruption on, {n}^3: {t_pair * 1e3:.1f} ms")


def _floor(x: np.ndarray, rng: np.random.Generator) -> float:
    """Lower bound: one gather + scatter with sequential indices over as many voxels as the windows hold."""
    flat = x.reshape(-1)
    m = int(10_000 * ((x.shape[1] // 10 + 1) / 2) ** 3)
    idx = np.arange(m, dtype=np.int64) % flat.size
    out = flat.copy()
    return _time(lambda: out.put(idx, flat.take(idx)), 3)


if __name__ == "__main__":
    main()

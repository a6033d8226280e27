"""Reproducible data-loader plumbing shared by every task: seeded loaders and workers that die with the trainer.

* :class:`SeededLoader` wraps a batchgenerators data loader (nnU-Net's ``nnUNetDataLoader`` with its
  transforms, or :class:`~nnpre_trainers.pretext_data.PretextPatchLoader`). nnU-Net's loader and the
  batchgeneratorsv2 transforms draw from the *global* numpy and torch RNGs; the wrapper gives the loader its
  own RNG states, seeded from ``(seed, worker id)``, swaps them in around each batch and restores the caller's
  global states afterwards — so a batch sequence is a function of the seed alone and no global state is left
  behind, in the main process (``nnUNet_n_proc_DA=0``) as in workers.
* :func:`start_augmenters` uses batchgenerators' ``MultiThreadedAugmenter``, which returns the workers'
  batches round-robin (nnU-Net's ``NonDetMultiThreadedAugmenter`` returns whichever is ready first, so the
  order would depend on timing), and starts the workers at once (a worker forked after the main process has
  run multi-threaded torch ops can deadlock in OpenMP).
* :func:`die_with_parent` (called in each worker): Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so a worker is
  killed when the trainer process dies, even by ``kill -9`` (which runs no cleanup code in the trainer).

GPU runs are not bit-reproducible: cuDNN picks non-deterministic kernels (``torch.backends.cudnn.benchmark``
is on in nnU-Net) and AMP atomics reorder sums. The guarantees here are for CPU.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

#: ``PR_SET_PDEATHSIG`` from ``<linux/prctl.h>``.
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: Optional[int] = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only; elsewhere a no-op).

    If the parent (``parent_pid``) is already gone when this runs, exit at once. Returns True when the
    death signal was installed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        ok = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl ran
        os._exit(1)
    return ok


class SeededLoader:
    """A batchgenerators loader with private numpy/torch RNG states (see the module doc).

    Args:
        loader: the wrapped loader (``next(loader)`` gives a batch dict).
        seed: base seed; worker ``i`` uses the seed sequence ``(seed, i)``; the main process ``(seed, 0)``.
    """

    def __init__(self, loader, seed: int):
        self.loader = loader
        self.seed = int(seed)
        self.thread_id = 0
        self.parent_pid = os.getpid()
        self._states: Optional[Tuple[tuple, torch.Tensor]] = None

    def set_thread_id(self, thread_id: int) -> None:
        """Called by batchgenerators in each worker process before its first batch."""
        die_with_parent(self.parent_pid)
        # one torch thread per worker, as nnU-Net's NonDetMultiThreadedAugmenter producer does: a worker forked
        # from a process whose OpenMP pool already ran (a second trainer in the same process, e.g. nnPre_demo)
        # otherwise spins forever in its first parallel region (seen in batchgeneratorsv2's FFT blur)
        torch.set_num_threads(1)
        self.thread_id = int(thread_id)
        self._states = None
        if hasattr(self.loader, "set_thread_id"):
            self.loader.set_thread_id(thread_id)

    def _initial_states(self):
        ss = np.random.SeedSequence([self.seed, self.thread_id])
        rs = np.random.RandomState(np.random.MT19937(ss))
        gen = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        return rs.get_state(), gen.get_state()

    def __getattr__(self, name):
        """Everything else (``generate_train_batch``, ``indices``, ...) is the wrapped loader's."""
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        return self

    def __next__(self):
        if self._states is None:
            self._states = self._initial_states()
        saved = np.random.get_state(), torch.get_rng_state()
        np.random.set_state(self._states[0])
        torch.set_rng_state(self._states[1])
        try:
            return next(self.loader)
        finally:
            self._states = np.random.get_state(), torch.get_rng_state()
            np.random.set_state(saved[0])
            torch.set_rng_state(saved[1])

    next = __next__


def start_augmenters(dl_train, dl_val, seed: int, num_processes: int, pin_memory: bool = False):
    """Wrap both loaders in :class:`SeededLoader` (val seeded ``seed + 1``) and run them in ``num_processes`` /
    ``max(1, num_processes // 2)`` workers (0: in this process). Workers are started before returning."""
    tr, va = SeededLoader(dl_train, seed), SeededLoader(dl_val, seed + 1)
    if num_processes == 0:
        return SingleThreadedAugmenter(tr, None), SingleThreadedAugmenter(va, None)
    n_val = max(1, num_processes // 2)
    loaders = (MultiThreadedAugmenter(tr, None, num_processes, max(6, num_processes // 2), None,
                                      pin_memory=pin_memory),
               MultiThreadedAugmenter(va, None, n_val, max(3, num_processes // 4), None, pin_memory=pin_memory))
    for loader in loaders:
        loader._start()
    return loaders

"""Seeded loaders: same seed → same batches, global RNG untouched; workers die with their parent."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch

from nnpre_trainers.loaders import SeededLoader


class GlobalRandomLoader:
    """Draws from the global numpy and torch RNGs, like nnU-Net's loader and batchgeneratorsv2."""

    def __next__(self):
        return {"np": np.random.randint(0, 10 ** 6, 4), "torch": torch.rand(3)}


def _batches(seed, n=3):
    dl = SeededLoader(GlobalRandomLoader(), seed)
    return [next(dl) for _ in range(n)]


def test_same_seed_same_batches_and_global_state_restored():
    np.random.seed(1)
    torch.manual_seed(1)
    np_before, t_before = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a, b, c = _batches(5), _batches(5), _batches(6)
    assert all(np.array_equal(x["np"], y["np"]) and torch.equal(x["torch"], y["torch"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["np"], c[0]["np"])
    assert not np.array_equal(a[0]["np"], a[1]["np"])  # the private state advances
    assert np.array_equal(np.random.get_state()[1], np_before) and torch.equal(torch.get_rng_state(), t_before)


def test_worker_streams_differ_by_thread_id():
    dl0, dl1 = SeededLoader(GlobalRandomLoader(), 5), SeededLoader(GlobalRandomLoader(), 5)
    dl1.thread_id = 1
    assert not np.array_equal(next(dl0)["np"], next(dl1)["np"])


def test_child_dies_with_parent(tmp_path):
    """A grandchild that called die_with_parent is SIGKILLed when its parent is killed with -9."""
    if not sys.platform.startswith("linux"):
        return
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import os, sys, time, multiprocessing as mp
        sys.path.insert(0, {os.getcwd()!r})
        from nnpre_trainers.loaders import die_with_parent
        def child(parent):
            die_with_parent(parent)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(120)
        if __name__ == "__main__":
            mp.set_start_method("fork")
            p = mp.Process(target=child, args=(os.getpid(),))
            p.start()
            time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert not _alive(child), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False



def test_wrapper_exposes_the_loader():
    inner = GlobalRandomLoader()
    inner.indices = ["a", "b"]
    assert SeededLoader(inner, 0).indices == ["a", "b"]

"""Benchmark: pretraining step time vs a plain supervised nnU-Net step, and the share of step time in compute.

Purpose (targets of the issue): on the same network and patch,

* step time of each pretraining trainer (MAE, Models Genesis, diffusion) / step time of the reference
  "nnUNetTrainer supervised step" (stock ``nnunetv2`` ``nnUNetTrainer`` on a labelled dataset planned with the
  same plans) must be <= 1.05;
* the share of a training step spent in network compute must be >= 0.95: corruption and loading happen in the
  background workers, not in the training loop.

Definitions. A *step* is what nnU-Net's training loop does per iteration: ``train_step(next(dataloader_train))``
(so it includes waiting for / receiving the batch from the background workers). *Network compute* is
``train_step`` on a batch fetched beforehand (forward, loss, backward, gradient clipping, optimizer step); one
batch is taken from the loader untimed just before it, so that the background worker refills its queue during
the compute-only step as it does during a real step (on a machine with fewer free cores than processes both
then see the same competition). All ratios are taken per round (the measurements of one round are seconds
apart) and their median over the rounds is printed: step / reference step, share = compute / step, "next()
share" = the part of the step spent in ``next()``. "worker / step" is the time one worker needs to produce a
batch (measured in the main process after the rounds) over the step time: that work runs in parallel with
the step.

Setup: a tiny labelled dataset (ellipsoid "lesions" in noise) is written to a temporary nnU-Net folder triple and
planned with the ``cpu-tiny`` preset (32³ patch, batch 2, ResEnc 8->64 features). All four trainers are built
from that one plans file with :func:`nnpre_trainers.run.make_trainer` (the pretraining ones ignore the labels),
their background workers are started (``on_train_start``) before any network runs, then every trainer does
warm-up steps and the timed rounds are interleaved (one full step + one compute-only step per trainer per round,
trainer order rotated each round), so load changes on a shared machine hit all of them alike. Only ratios are
printed.

Run: ``python benchmarks/bench_pretrain_step.py [--workers 1] [--rounds 12] [--threads 1] [--quick]``
(``--quick``: 3 cases, 2 warm-up steps, 5 rounds). ``--workers`` sets ``nnUNet_n_proc_DA`` (background
workers per training loader; the validation loaders get ``max(1, workers // 2)`` more). ``--threads`` sets the
torch threads of the training process; the default 1 keeps CPU runs stable: with several OpenMP threads on a
small machine every parallel region waits for a thread that a background worker (or another job) has
displaced, and steps vary by 10x. On a GPU machine add ``--device cuda --threads 0`` (network compute on the
GPU; the ResEnc-L 128³ comparison needs the default geometry: ``--preset gpu``).

Faithful Models Genesis on the faithful geometry without a GPU: ``--corruption-only [--patch 128] [--batch 2]``
measures, per sample and in this process (one thread, as one background worker), what a worker does for one
faithful Models Genesis pair (official rates, 10,000-window local shuffle with p 0.5, Bézier, painting), for
the brick approximation, and for nnU-Net's own supervised augmentation of a 128³ patch (``nnUNetTrainer.
get_training_transforms``: spatial, noise, blur, brightness, contrast, low resolution, gamma, mirroring). With
``W`` workers a loader produces ``W / (batch x seconds per sample)`` batches per second, so the faithful MG step
stays <= 1.05 x the supervised step as long as ``W >= batch x seconds per sample / (1.05 x GPU step time)``
(the network, patch and batch are the same as supervised; only the output channels differ). The GPU step time
is *stated* (``--gpu-step-s``, several values), not measured here; the script prints the workers needed per
value and whether nnU-Net's default of 12 workers (``get_allowed_n_proc_DA`` without a known hostname) is
enough. Times measured on a loaded machine are upper bounds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

TARGET_RATIO = 1.05
NNUNET_DEFAULT_WORKERS = 12
TARGET_SHARE = 0.95
REFERENCE = "nnUNetTrainer supervised step"


def write_labelled_dataset(raw_root: str, did: int, n_cases: int, shape=(40, 96, 96),
                           spacing=(0.8, 0.8, 2.5)) -> str:
    """Write ``Dataset{did}_Bench``: noisy volumes with one bright ellipsoid "lesion" each (label 1).

    ``shape`` is (Z, Y, X) in voxels, ``spacing`` (x, y, z) in mm.
    """
    import SimpleITK as sitk

    d = os.path.join(raw_root, f"Dataset{did:03d}_Bench")
    os.makedirs(os.path.join(d, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(d, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(did)
    for i in range(n_cases):
        zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
        c = [s / 2 + rng.uniform(-s / 6, s / 6) for s in shape]
        lab = (((zz - c[0]) / (shape[0] / 6)) ** 2 + ((yy - c[1]) / 10) ** 2 + ((xx - c[2]) / 10) ** 2 < 1)
        img = rng.normal(0, 1, shape).astype(np.float32) + 3 * lab
        for arr, sub, dtype in ((img, "imagesTr", np.float32), (lab, "labelsTr", np.uint8)):
            im = sitk.GetImageFromArray(arr.astype(dtype))
            im.SetSpacing(spacing)
            name = f"c{i:03d}_0000.nii.gz" if sub == "imagesTr" else f"c{i:03d}.nii.gz"
            sitk.WriteImage(im, os.path.join(d, sub, name))
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                   "numTraining": n_cases, "file_ending": ".nii.gz"}, f)
    return d


@contextlib.contextmanager
def quiet():
    """Silence the trainers' console output (nnU-Net prints plans, banners, epochs)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def build_trainers(did: int, plans_name: str, device: str) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnpre_trainers.aliases import PRETRAIN_TRAINERS
    from nnpre_trainers.run import make_trainer

    classes = {REFERENCE: nnUNetTrainer, "MAE": PRETRAIN_TRAINERS["mae"], "MG": PRETRAIN_TRAINERS["mg"],
               "diffusion": PRETRAIN_TRAINERS["diffusion"]}
    trainers = {}
    for name, cls in classes.items():
        t = make_trainer(cls, did, plans_name, fold="all", device=device)
        if hasattr(t, "show_progress"):
            t.show_progress = False
        trainers[name] = t
    # start every trainer's background workers before any network runs (a worker forked after multi-threaded
    # torch ops can deadlock in OpenMP)
    for t in trainers.values():
        t.on_train_start()
    for t in trainers.values():
        t.on_train_epoch_start()
    return trainers


def time_steps(trainers: dict, warmup: int, rounds: int, sync) -> dict:
    """Interleaved timing; returns per trainer lists of step, compute-only and next() times.

    Per round and trainer: one step (``next`` + ``train_step``, timed) and one compute-only step
    (``train_step`` on a batch fetched before the timed rounds). Before the compute-only step one batch is
    taken from the loader untimed, so that the background worker refills its queue during it exactly as
    during a step: on a machine with fewer free cores than processes, both see the same competition.
    """
    names = list(trainers)
    for _ in range(warmup):
        for n in names:
            t = trainers[n]
            t.train_step(next(t.dataloader_train))
    prefetched = {n: next(trainers[n].dataloader_train) for n in names}
    res = {n: {"step": [], "compute": [], "next": []} for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = trainers[n]
            sync()
            t0 = time.perf_counter()
            batch = next(t.dataloader_train)
            t1 = time.perf_counter()
            t.train_step(batch)
            sync()
            t2 = time.perf_counter()
            next(t.dataloader_train)  # untimed: same worker activity as during the step
            sync()
            t3 = time.perf_counter()
            t.train_step(prefetched[n])
            sync()
            t4 = time.perf_counter()
            res[n]["step"].append(t2 - t0)
            res[n]["next"].append(t1 - t0)
            res[n]["compute"].append(t4 - t3)
    return res


def background_work(trainers: dict, repeats: int) -> dict:
    """Median time of producing one batch in this process (what a background worker does per batch)."""
    out = {}
    for n, t in trainers.items():
        loader = t.dataloader_train.generator
        loader.generate_train_batch()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loader.generate_train_batch()
            times.append(time.perf_counter() - t0)
        out[n] = float(np.median(times))
    return out


def _median_time(fn, n: int) -> tuple:
    """(median, mean) seconds of ``n`` calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.mean(times))


def corruption_only(patch: int, batch: int, samples: int, gpu_steps) -> int:
    """Per-sample worker time of faithful Models Genesis vs nnU-Net's supervised augmentation; workers needed."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnpre_trainers.pretext.model_genesis import ModelGenesisConfig, model_genesis_pair

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, patch, patch, patch)).astype(np.float32)
    rows = {}
    for name, cfg in (("MG faithful (windows)", ModelGenesisConfig()),
                      ("MG bricks (opt-in)", ModelGenesisConfig(local_shuffle="bricks"))):
        model_genesis_pair(x, rng, cfg)
        # the mean over samples is what matters for throughput (the shuffle runs in half of them)
        rows[name] = _median_time(lambda: model_genesis_pair(x, rng, cfg), samples)[1]
    tr = nnUNetTrainer.get_training_transforms(
        [patch] * 3, (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi), None, (0, 1, 2), False,
        use_mask_for_norm=[False], foreground_labels=[1])
    img = torch.from_numpy(rng.standard_normal((1, patch, patch, patch)).astype(np.float32))
    seg = torch.from_numpy((rng.random((1, patch, patch, patch)) > 0.9).astype(np.int16))

    def supervised():
        with torch.no_grad():
            tr(image=img.clone(), segmentation=seg.clone())

    supervised()
    rows["nnU-Net supervised DA"] = _median_time(supervised, samples)[1]
    print(f"worker time per sample, {patch}^3, 1 thread, mean of {samples} samples (this machine; upper bounds "
          f"when it is loaded):")
    for name, t in rows.items():
        print(f"  {name:24s} {t:7.3f} s/sample   {batch * t:7.3f} s per batch of {batch}")
    print(f"workers needed so that the loader keeps up with a step <= {TARGET_RATIO} x the supervised GPU step "
          f"(stated GPU step times, not measured here); nnU-Net default = {NNUNET_DEFAULT_WORKERS}:")
    names = list(rows)
    print("  " + f"{'GPU step (s)':>12s}" + "".join(f"{n:>26s}" for n in names))
    for g in gpu_steps:
        cells = []
        for n in names:
            w = math.ceil(batch * rows[n] / (TARGET_RATIO * g))
            cells.append(f"{w:>3d} ({'ok' if w <= NNUNET_DEFAULT_WORKERS else 'more than 12'})")
        print("  " + f"{g:>12.2f}" + "".join(f"{c:>26s}" for c in cells))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corruption-only", action="store_true",
                    help="measure per-sample worker time of faithful Models Genesis at --patch and print the "
                         "workers needed for stated GPU step times (no trainers, no GPU)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="batch size for --corruption-only (nnU-Net default 2)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--gpu-step-s", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                    help="stated GPU step times (s) for --corruption-only")
    ap.add_argument("--workers", type=int, default=1, help="nnUNet_n_proc_DA: background workers per train loader")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the training process (default 1; 0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--quick", action="store_true", help="3 cases, 2 warm-up steps, 5 rounds")
    args = ap.parse_args()
    if args.corruption_only:
        return corruption_only(args.patch, args.batch, args.samples, args.gpu_step_s)
    if args.quick:
        args.cases, args.warmup, args.rounds = 3, 2, 5
    os.environ["nnUNet_n_proc_DA"] = str(args.workers)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nnpre.nnunet_env import use_root
    from planners.pipeline import plan_dataset

    did = 987
    with tempfile.TemporaryDirectory(prefix="nnpre_bench_step_") as root:
        env = use_root(root)
        with quiet():
            write_labelled_dataset(env["nnUNet_raw"], did, args.cases)
            plan = plan_dataset(did, preset=args.preset, num_processes=1)
            torch.manual_seed(0)
            trainers = build_trainers(did, plan.plans_identifier, args.device)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        try:
            with quiet():
                res = time_steps(trainers, args.warmup, args.rounds, sync)
                work = background_work(trainers, 3 if args.quick else 5)
        finally:
            for t in trainers.values():
                for dl in (getattr(t, "dataloader_train", None), getattr(t, "dataloader_val", None)):
                    if hasattr(dl, "_finish"):
                        dl._finish()
    cfg = plan.configuration
    # paired per round (the measurements of one round are seconds apart), then the median over rounds
    ref_steps = np.array(res[REFERENCE]["step"])
    med = {n: {"ratio": float(np.median(np.array(d["step"]) / ref_steps)),
               "share": float(np.median(np.array(d["compute"]) / np.array(d["step"]))),
               "next": float(np.median(np.array(d["next"]) / np.array(d["step"]))),
               "step": float(np.median(d["step"]))} for n, d in res.items()}
    print(f"pretraining step vs {REFERENCE}: preset {args.preset}, patch {cfg['patch_size']}, batch "
          f"{cfg['batch_size']}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"nnUNet_n_proc_DA={args.workers} background worker(s) per train loader; median of {args.rounds} "
          f"interleaved rounds (ratios paired per round)")
    print(f"  {'trainer':32s} {'step / ref':>10s} {'compute share':>14s} {'next() share':>13s} "
          f"{'worker / step':>13s}  verdict")
    failed = False
    for n, m in med.items():
        ratio, share, nxt = m["ratio"], m["share"], m["next"]
        if n == REFERENCE:
            verdict = "reference" + ("" if share >= TARGET_SHARE else f", share FAIL (< {TARGET_SHARE})")
        else:
            ok_r, ok_s = ratio <= TARGET_RATIO, share >= TARGET_SHARE
            failed |= not (ok_r and ok_s)
            verdict = (f"ratio {'PASS' if ok_r else 'FAIL'} (<= {TARGET_RATIO}), "
                       f"share {'PASS' if ok_s else 'FAIL'} (>= {TARGET_SHARE})")
        print(f"  {n:32s} {ratio:10.3f} {share:14.3f} {nxt:13.3f} {work[n] / m['step']:13.3f}  {verdict}")
    print("  (worker / step: time one background worker needs per batch, in this process, / step time; it runs in "
          "parallel with the step and only costs step time when no core is free for it)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one Retina U-Net training step vs one nnU-Net segmentation step on the same network, patch and batch.

Purpose (issue "step cost"): detection step / segmentation step <= 1.25.

Reference ("segmentation"): nnU-Net's ``ResidualEncoderUNet`` built from the same architecture entry, with deep
supervision and nnU-Net's Dice + CE loss (``DeepSupervisionWrapper(DC_and_CE_loss)``): forward, loss, backward,
gradient clipping at 12, SGD step. Measured ("detection"): :func:`nnpre_detection.retina_unet.build_retina_unet`
with the preset's detector options: targets from the collated batch target
(:func:`nnpre_detection.targets.targets_from_batch`), forward, ATSS matching, hard-negative sampling, BCE + GIoU
+ CE/Dice loss, backward, clipping, SGD step. Targets come from :class:`nnpre_detection.targets.BoxTargetsTransform`
as nnU-Net's data-loader workers produce them (line "worker targets"); the line "in-step targets" builds them
from the seg patch inside the step (connected components and boxes on the training process), as before the
transform existed. Both models see the same random batch (two foreground objects per patch). Steps are timed
interleaved (median of ``--repeats`` rounds) and a breakdown of the detection step (network forward, loss =
matching + sampling + losses, backward + optimizer) is printed as shares of the segmentation step. Only ratios.

Run: ``python benchmarks/bench_detection_step.py [--preset cpu-tiny|gpu] [--patch 32] [--batch 2] [--repeats 7]
[--clock cpu]`` (``--quick``: 3 repeats; ``--clock cpu`` times this thread's CPU time, steadier than wall time on a
shared machine). Exit status 1 when the worker-targets ratio misses the target. The ``gpu`` preset uses
nnDetection's detector defaults (27 anchors, levels from its rule) on the same tiny CPU network, to show what
the cpu-tiny options change.

Measured (2 shared cores under load 8-12, ``--clock cpu --repeats 9``, worker targets; before = commit be9cfc3):

* cpu-tiny (heads 32, FPN 32, strides 2/4/8, 27 anchors): 2.15 before -> 1.67-1.68 after the same-math speedups
  (regressor output conv only at the sampled positives, classifier gradient only at the sampled anchors,
  channels-last heads and decoder output convs on CPU -- the position-major flatten of a channels-first output
  and its gradient cost more than the output conv --, ATSS IoU on the candidates only). Breakdown after:
  forward 0.44, loss 0.16, backward + step 1.05 (before: 0.62 / 0.16 / 1.35). Target not met by the defaults.
* cpu-tiny with ``--det fpn_channels=16 head_channels=16``: 1.13-1.24 (meets the target) but learns less
  (``benchmarks/bench_detection_learning.py``: AP@0.1 below segmentation on the mean of seeds 0-2), so not adopted.
* ``--det fpn_channels=16`` alone: 1.39; ``--det head_channels=16`` alone: 1.41.
* ``--preset gpu`` (nnDetection's 128-channel heads on this 8-channel network): 6.07 before -> 4.32.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

TARGET = 1.25


def arch_kwargs(n_stages: int = 4) -> dict:
    from nnpre.adaptation_plan import unet_arch_kwargs

    return unet_arch_kwargs([min(8 * 2 ** i, 64) for i in range(n_stages)], [[3, 3, 3]] * n_stages,
                            [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1), [1] * n_stages, [1] * (n_stages - 1))


def resenc_l_arch_kwargs(n_stages: int = 6) -> dict:
    """The faithful preset's network (``nnpre.presets`` ``gpu``: ResEnc-L widths 32 -> 320 and blocks 1, 3, 4, 6, ...;
    6 stages as nnU-Net plans it for a 128³ patch; one decoder conv per stage as nnU-Net's ResEnc planners)."""
    from nnpre.adaptation_plan import unet_arch_kwargs
    from nnpre.presets import get_preset

    g = get_preset("gpu")
    feats = [min(g.base_features * 2 ** i, g.max_features) for i in range(n_stages)]
    return unet_arch_kwargs(feats, [[3, 3, 3]] * n_stages, [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                            list(g.n_blocks_per_stage[:n_stages]), [1] * (n_stages - 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-tiny", choices=["cpu-tiny", "gpu"])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--det", nargs="*", default=[], metavar="KEY=VALUE",
                    help="RetinaUNetConfig overrides (JSON values), e.g. decoder_levels=[2,3]")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this thread's CPU time (time.thread_time; steadier on a busy machine; --threads 1)")
    ap.add_argument("--network", default="tiny", choices=["tiny", "resenc-l"],
                    help="tiny: the cpu-tiny-like network (4-5 stages, 8->64 channels); resenc-l: the faithful "
                         "preset's ResEnc-L with 6 stages (use with --preset gpu; --patch 64 keeps CPU runs short)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    repeats = 3 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnpre_detection.recipe import preset_detector_overrides
    from nnpre_detection.retina_unet import DEFAULT_REQ_IMPORT, _resolve_imports, build_retina_unet
    from nnpre_detection.targets import BoxTargetsTransform, targets_from_batch

    if args.network == "resenc-l":
        n_stages = 6
        ak = resenc_l_arch_kwargs(n_stages)
    else:
        n_stages = 4 if args.patch <= 32 else 5
        ak = arch_kwargs(n_stages)
    torch.manual_seed(0)
    seg_net = ResidualEncoderUNet(input_channels=1, num_classes=2, deep_supervision=True,
                                  **_resolve_imports(ak, DEFAULT_REQ_IMPORT))
    w = np.array([1 / 2 ** i for i in range(n_stages)])
    w[-1] = 0
    seg_loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False,
                                                      "ddp": False}, {}, 1, 1,
                                                     dice_class=MemoryEfficientSoftDiceLoss), w / w.sum())
    import json

    over = dict(preset_detector_overrides(args.preset, n_stages))
    for kv in args.det:
        k, v = kv.split("=", 1)
        try:
            v = json.loads(v)
        except ValueError:
            pass
        over[k] = tuple(v) if isinstance(v, list) else v
    det = build_retina_unet("ResidualEncoderUNet", ak, 1, 1, **over)
    opt_s = torch.optim.SGD(seg_net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    opt_d = torch.optim.SGD(det.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    p, b = args.patch, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, p, p, p, generator=g)
    lab = torch.zeros(b, 1, p, p, p, dtype=torch.int16)
    q = p // 4
    for i in range(b):
        lab[i, 0, q:2 * q, q:2 * q, q:2 * q] = 1
        lab[i, 0, 2 * q + 1:3 * q + 2, 2 * q:3 * q, q + i:2 * q + i] = 1
    tr = BoxTargetsTransform()
    samples = [tr(image=x[i], segmentation=lab[i])["segmentation"] for i in range(b)]
    worker_target = [torch.stack([s[k] for s in samples]) for k in range(2)]

    def seg_step():
        outs = seg_net(x)
        ys = [F.interpolate(lab.float(), size=o.shape[2:], mode="nearest") for o in outs]
        loss = seg_loss(outs, ys)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(seg_net.parameters(), 12)
        opt_s.step()

    parts = {"forward": [], "loss": [], "backward+step": []}

    def det_step(target, record=False):
        t0 = clock()
        targets = targets_from_batch(target)
        out = det.head_outputs(x, sparse=True)  # what the training forward runs
        t1 = clock()
        loss = det.compute_loss(out, targets)["loss"]
        t2 = clock()
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 12)
        opt_d.step()
        t3 = clock()
        if record:
            parts["forward"].append(t1 - t0)
            parts["loss"].append(t2 - t1)
            parts["backward+step"].append(t3 - t2)

    det.train()
    seg_net.train()
    for _ in range(2):  # warm-up
        seg_step()
        det_step(worker_target)
    ts, tw, ti = [], [], []
    for _ in range(repeats):
        t0 = clock()
        seg_step()
        t1 = clock()
        det_step(worker_target, record=True)
        t2 = clock()
        det_step(lab)
        t3 = clock()
        ts.append(t1 - t0)
        tw.append(t2 - t1)
        ti.append(t3 - t2)
    s = float(np.median(ts))
    ratio_w, ratio_i = float(np.median(tw)) / s, float(np.median(ti)) / s
    print(f"preset {args.preset}: patch {p}^3, batch {b}, {n_stages} stages, detector options {over}, "
          f"{det.anchor_generator.num_anchors_per_location} anchors per position, levels {det.decoder_levels}")
    print(f"detection step / segmentation step (worker targets):  {ratio_w:.2f}  (target <= {TARGET})")
    print(f"detection step / segmentation step (in-step targets): {ratio_i:.2f}")
    print("detection step breakdown, shares of the segmentation step: " +
          ", ".join(f"{k} {np.median(v) / s:.2f}" for k, v in parts.items()))
    return 0 if ratio_w <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

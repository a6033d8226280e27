"""Benchmark: Retina U-Net sliding-window inference time vs the network forward passes over the same tiles.

Purpose (target of the issue): ``nnpre_detection.inference.predict_case(..., mirror=False)`` on a case must cost
at most 1.10x the pure network forward passes over the same tiles (same count): tiling, per-patch decoding /
top-k / NMS (``RetinaUNet.postprocess``) and the weighted box clustering (WBC) that merges the tiles may add at
most 10 %.

Reference ("forward"): ``model.head_outputs(tile)`` (encoder, UFPN decoder, classification / regression /
segmentation heads, anchors) on every tile ``predict_case`` visits, tiles cut beforehand, under
``torch.no_grad`` in eval mode. Measured ("predict_case"): the full call on the case. Both are timed
interleaved in the same run (median of ``--repeats``); a breakdown of the overhead (postprocess, and the tile
merge ``merge_detections`` next to one plain ``weighted_box_clustering`` call on the same boxes, with a check
that both give the same result) is printed as shares of the forward time. Only ratios are printed.

Model: a cpu-tiny-like Retina U-Net (ResEnc encoder, 4 stages, 8->64 features, one block per stage, head width
32, one foreground class) with its initial weights (prior probability 0.01): every tile then yields the full
``detections_per_image`` = 100 low-score boxes, as an undertrained or any real model does at score threshold
0.0 (nnDetection's setting), so NMS and WBC see a realistic load. Case: (1, 48, 48, 48), 32³ tiles, overlap 0.5
(8 tiles).

Run: ``python benchmarks/bench_sliding_window.py [--size 48 48 48] [--repeats 5] [--threads 1] [--quick]``
(``--quick``: 3 repeats). Exit status 1 when the ratio misses the target. ``--threads 0`` keeps torch's default
thread count (noisier on a shared machine).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import torch

TARGET = 1.10
PATCH = (32, 32, 32)


def tiny_arch_kwargs(n_stages: int = 4) -> dict:
    """nnU-Net plans architecture entry of the cpu-tiny preset (class paths as strings)."""
    from nnpre.adaptation_plan import unet_arch_kwargs

    return unet_arch_kwargs([min(8 * 2 ** i, 64) for i in range(n_stages)], [[3, 3, 3]] * n_stages,
                            [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1), [1] * n_stages, [1] * (n_stages - 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[48, 48, 48], help="case shape (X Y Z) in voxels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    from nnpre_detection.boxes import clip_boxes
    from nnpre_detection.inference import WBC_IOU, _starts, merge_detections, predict_case
    from nnpre_detection.retina_unet import build_retina_unet
    from nnpre_detection.wbc import weighted_box_clustering

    torch.manual_seed(0)
    model = build_retina_unet("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                              tiny_arch_kwargs(), num_input_channels=1, num_classes=1, head_channels=32).eval()
    image = torch.randn(1, *args.size)
    starts = list(itertools.product(*[_starts(s, p, 0.5) for s, p in zip(image.shape[1:], PATCH)]))
    tiles = [image[:, a:a + PATCH[0], b:b + PATCH[1], c:c + PATCH[2]][None].contiguous() for a, b, c in starts]

    def forward_only():
        return [model.head_outputs(t) for t in tiles]

    def full():
        return predict_case(model, image, PATCH, overlap=0.5, mirror=False)

    t_fwd, t_full = [], []
    with torch.no_grad():
        forward_only()
        full()
        for _ in range(repeats):
            for name, fn, acc in (("forward", forward_only, t_fwd), ("predict_case", full, t_full)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        # breakdown on the same inputs
        outs = forward_only()
        t0 = time.perf_counter()
        dets = [model.postprocess(o)[0] for o in outs]
        t_post = time.perf_counter() - t0
        offsets = [torch.tensor([a, b, a, b, c, c], dtype=torch.float32) for a, b, c in starts]
        boxes = clip_boxes(torch.cat([d["boxes"] + o for d, o in zip(dets, offsets)]), tuple(image.shape[1:]))
        scores = torch.cat([d["scores"] for d in dets])
        labels = torch.cat([d["labels"] for d in dets])
        t0 = time.perf_counter()
        merged = merge_detections(boxes, scores, labels, n_exp_preds=1.0, iou_threshold=WBC_IOU)
        t_merge = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = weighted_box_clustering(boxes, scores, labels, n_exp_preds=1.0, iou_threshold=WBC_IOU)
        t_wbc = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(merged, plain))
    fwd, tot = float(np.median(t_fwd)), float(np.median(t_full))
    ratio = tot / fwd
    print(f"Retina U-Net sliding window, case {tuple(args.size)}, patch {PATCH}, overlap 0.5, {len(tiles)} tiles, "
          f"mirror off, torch threads {torch.get_num_threads()}, median of {repeats} interleaved runs")
    print(f"  predict_case / forward over the same tiles  {ratio:6.3f}   target <= {TARGET}: "
          f"{'PASS' if ratio <= TARGET else 'FAIL'}")
    print(f"  breakdown / forward: postprocess (decode, top-k, NMS; {len(tiles)} tiles) {t_post / fwd:.3f}, "
          f"tile merge ({boxes.shape[0]} boxes -> {merged[0].shape[0]}) {t_merge / fwd:.3f} "
          f"(one plain weighted_box_clustering call: {t_wbc / fwd:.3f}; same result: {'yes' if same else 'NO'})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

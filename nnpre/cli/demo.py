"""``nnPre_demo``: the whole study on built-in synthetic data — pretrain → fine-tune → evaluate → report.

1. synthetic data (labelled set + held-out test set + unlabelled pool, :mod:`nnpre.synthetic`);
2. planning and preprocessing with the nnPre planner (both datasets, same geometry);
3. pretraining with each pretext method on the pool (default MAE, Model Genesis, diffusion; ``--methods all``:
   every registered task);
4. segmentation (nnU-Net) and detection (Retina U-Net) fine-tuning from each checkpoint and from scratch
   (5 % decoder-only warm-up for the pretrained runs) for each labelled-set size and seed; ``--adapters
   full,lora,probe-linear`` fine-tunes each checkpoint once per adapter (``nnpre_trainers.adapters``; default
   ``full`` only; scratch always trains fully; adapters that cannot train a Retina U-Net, probe-mlp, get
   segmentation arms only, with a printed note);
5. evaluation on the test set: Dice (nnU-Net's evaluation), detection metrics (FROC, AP@IoU 0.1,
   nnDetection definitions) of the Retina U-Net boxes and of the connected components of each segmentation;
6. a report folder: ``report.md`` (arm × labelled cases, mean ± std over seeds; with adapters also each arm's
   trainable parameters and the comparison with full fine-tuning), ``results.json``, PNG plots (metric vs
   labelled cases, pretraining loss curves and previews, FROC curves).

Every stage writes a marker when it completes; rerunning skips finished stages and redoes unfinished ones.
The ``cpu-tiny`` preset (default) fits in about 15 minutes on 2 CPU cores; ``--preset gpu`` uses the faithful
geometry (1 mm, 128³, ResEnc-L) at lengths estimated at ~7 h on one GPU. ``--dry-run`` prints the grid, the
iterations per run and the time estimate. The study itself is the library :mod:`nnpre.study`; this module
only parses arguments.
"""
from __future__ import annotations

import argparse
import os

from nnpre.cli._common import ArgumentParser, cli_entry
from nnpre.study.grid import BUDGETS, DEFAULT_ADAPTERS, DEFAULT_LABELLED, DEFAULT_METHODS

#: budget fields that have a command-line override of the same name
_OVERRIDES = ("pretrain_iterations", "pretrain_epochs", "finetune_iterations", "finetune_epochs", "n_train",
              "n_test", "n_pool", "difficulty", "detect_epochs", "detect_iterations")


def build_parser() -> argparse.ArgumentParser:
    from nnpre.synthetic import SYNTH_PRESETS

    p = ArgumentParser(prog="nnPre_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="nnpre_demo_out", help="output folder (default ./nnpre_demo_out)")
    p.add_argument("--preset", default="cpu-tiny", choices=sorted(BUDGETS))
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per configuration (default 1)")
    p.add_argument("--labelled", default=",".join(map(str, DEFAULT_LABELLED)),
                   help="labelled-set sizes, comma separated (default %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="pretext tasks, comma separated, or 'all' for every registered task (default %(default)s)")
    p.add_argument("--adapters", default=",".join(DEFAULT_ADAPTERS), metavar="NAMES",
                   help="how each pretrained checkpoint is fine-tuned, comma separated: one arm per adapter of "
                        "nnpre_trainers.adapters (full, lora, molre, probe-linear, probe-mlp; default options as "
                        "nnPre_train --adapter); default %(default)s = full fine-tuning only")
    p.add_argument("--dry-run", action="store_true",
                   help="print the grid, the arms, the iterations per run and the estimated time, then exit")
    p.add_argument("--pretrain-iterations", type=int, default=None, help="override: iterations per epoch")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-iterations", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--detect-iterations", type=int, default=None, help="override for the detection runs")
    p.add_argument("--detect-epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-pool", type=int, default=None)
    p.add_argument("--difficulty", default=None, choices=sorted(SYNTH_PRESETS),
                   help="synthetic difficulty (default: the budget's; 'cpu' for cpu-tiny, 'default' for gpu)")
    return p


def config_from_args(args: argparse.Namespace):
    """:class:`nnpre.study.StudyConfig` from parsed arguments (bad values → one-line error)."""
    from nnpre.study import StudyConfig, StudyGrid, parse_adapters, parse_labelled, parse_methods

    budget = BUDGETS[args.preset].with_overrides(**{k: getattr(args, k) for k in _OVERRIDES})
    sizes = parse_labelled(args.labelled, budget.n_train)
    grid = StudyGrid(methods=parse_methods(args.methods), labelled=sizes, seeds=args.seeds,
                     adapters=parse_adapters(args.adapters))
    return StudyConfig(out=os.path.abspath(args.out), preset=args.preset, budget=budget, grid=grid)


def run(args: argparse.Namespace) -> int:
    from nnpre.study import describe, run_study, write_report

    cfg = config_from_args(args)
    if args.dry_run:
        print(describe(cfg.grid, cfg.budget, cfg.preset))
        return 0
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "false")
    res = run_study(cfg)
    report = write_report(cfg.out, res.records, cfg.grid, cfg.budget, cfg.preset,
                          max(res.stage_seconds, res.wall_seconds), res.wall_seconds)
    print(report)
    print(f"\nreport: {os.path.join(cfg.out, 'report', 'report.md')}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()

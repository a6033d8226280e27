"""``nnPre_train``: pretrain, fine-tune or train a detector on a dataset planned with ``nnPre_plan``.

Examples::

    nnPre_train pretrain -d 502 -t mae --preset cpu-tiny
    nnPre_train finetune -d 501 --pretrained RESULTS/.../checkpoint_final.pth
    nnPre_train finetune -d 501 --from-scratch --num-train-cases 2
    nnPre_train detect   -d 501 --pretrained CKPT
    nnPre_train finetune -d 501 --pretrained CKPT --adapter lora --lora-rank 8   # or molre, probe-linear, ...
    torchrun --nproc_per_node=2 -m nnpre.cli.train pretrain -d 502 -t mae   # DDP (gloo on CPU)
    nnPre_train pretrain -d 502 -t mae --amp bf16 --compile on   # mixed precision / torch.compile choices
"""
from __future__ import annotations

import argparse

from nnpre.cli._common import (
    ArgumentParser,
    NumGpusAction,
    add_device_argument,
    add_root_argument,
    apply_root,
    cli_entry,
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-pl", "-p", "--plans", default=None,
                   help="resenc-l (nnPreResEncLPlans, default), plain (nnPrePlans) or a plans identifier; with "
                        "--pretrained CKPT the default is the plans nnPre_plan --like CKPT wrote")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default=None, help="fold (0-4) or 'all'")
    p.add_argument("--preset", default=None,
                   help="training length and pretext-default preset (default: the one in the plans; --set wins "
                        "over its pretext defaults)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    add_device_argument(p)
    p.add_argument("-num_gpus", type=int, default=1, action=NumGpusAction,
                   help="nnU-Net's spelling; 1 (several GPUs: torchrun --nproc_per_node=N -m nnpre.cli.train ...)")
    p.add_argument("--c", dest="resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="train again from scratch into a run folder whose run has finished (checkpoint_final.pth)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"],
                   help="mixed precision: auto (default, nnU-Net's: fp16 autocast + GradScaler on CUDA, fp32 on CPU), "
                        "off, fp16 (CUDA only), bf16 (CUDA or CPU); parameters stay fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the network: auto (default, nnU-Net's: on for CUDA unless nnUNet_compile is "
                        "false, off on CPU), on (also on CPU), off")
    add_root_argument(p)


def _pretext_choices():
    from nnpre_trainers.aliases import pretext_choices

    return pretext_choices()


def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    from nnpre_trainers.adapters import list_adapters

    p.add_argument("--adapter", default="full", choices=list_adapters(),
                   help="what trains (nnpre_trainers/adapters): full (default), lora / molre (low-rank updates on the "
                        "frozen encoder's convs), probe-linear / probe-mlp (frozen encoder, light heads)")
    p.add_argument("--lora-rank", type=int, default=None, help="lora / molre: rank (per expert for molre)")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora / molre: scaling numerator (alpha / rank)")
    p.add_argument("--adapter-layers", default=None, metavar="REGEX",
                   help="lora / molre: encoder convs to adapt, re.search on module names (default '^encoder\\.')")


def _adapter(args: argparse.Namespace):
    from nnpre.errors import fail
    from nnpre_trainers.adapters import get_adapter

    low_rank = dict(rank=args.lora_rank, alpha=args.lora_alpha, layers=args.adapter_layers)
    if args.adapter not in ("lora", "molre"):
        if any(v is not None for v in low_rank.values()):
            fail(f"--lora-rank / --lora-alpha / --adapter-layers apply to --adapter lora or molre, not {args.adapter}")
        low_rank = {}
    return get_adapter(args.adapter, **low_rank)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnPre_train", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="self-supervised pretraining on images only")
    _common(pre)
    pre.add_argument("-t", "--task", required=True,
                     help="pretext task: " + ", ".join(_pretext_choices()) + " (every registered task)")
    pre.add_argument("--set", dest="pretext_config", action="append", default=[], metavar="KEY=VALUE",
                     help="override a pretext hyperparameter, e.g. --set mask_ratio=0.6 (repeatable)")
    ft = sub.add_parser("finetune", help="segmentation fine-tuning from a pretrained encoder (or from scratch)")
    _common(ft)
    g = ft.add_mutually_exclusive_group(required=True)
    g.add_argument("--pretrained", metavar="CKPT", help="pretrained checkpoint (nnpre, nnssl or nnU-Net)")
    g.add_argument("--from-scratch", action="store_true", help="same configuration without loading weights")
    ft.add_argument("--num-train-cases", type=int, default=None, help="use only N labelled training cases")
    ft.add_argument("--fraction", type=float, default=None, help="use only this fraction of labelled cases")
    ft.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final sliding-window validation")
    _adapter_arguments(ft)
    det = sub.add_parser("detect", help="train a Retina U-Net detector")
    _common(det)
    det.add_argument("--pretrained", metavar="CKPT", default=None)
    det.add_argument("--num-train-cases", type=int, default=None)
    det.add_argument("--no-validation", action="store_true",
                     help="skip the post-processing sweep on the fold's validation cases (inference_plan.json; "
                          "nnPre_predict then uses nnDetection's default parameters)")
    _adapter_arguments(det)
    return p


def _parse_value(v: str):
    import json

    try:
        return json.loads(v)
    except ValueError:
        return v


def run(args: argparse.Namespace) -> int:
    apply_root(args)
    from nnpre.errors import fail
    from nnpre_trainers.run import make_trainer, maybe_resume, resolve_plans_name
    from nnpre_trainers.trainer import ddp_setup_from_env, run_variant

    ddp_setup_from_env()
    plans = resolve_plans_name(args.plans, args.dataset, getattr(args, "pretrained", None))
    common = dict(dataset=args.dataset, plans_name=plans, configuration=args.configuration, device=args.device,
                  continue_training=args.resume, preset=args.preset, epochs=args.epochs, iterations=args.iterations)
    if args.command == "pretrain":
        from nnpre_trainers.aliases import pretrain_trainer, resolve_pretext

        task = resolve_pretext(args.task)
        overrides = {}
        for kv in args.pretext_config:
            if "=" not in kv:
                fail(f"--set expects KEY=VALUE, got '{kv}'")
            k, v = kv.split("=", 1)
            overrides[k] = _parse_value(v)
        trainer = make_trainer(pretrain_trainer(task), fold=args.fold or "all", **common)
        if overrides:
            trainer.set_pretext(task, **overrides)
        trainer.seed = args.seed
    elif args.command == "finetune":
        from nnpre_trainers.aliases import nnPreFineTuneTrainer

        adapter = _adapter(args)
        # the run's plans variant (<plans>_scratch, <plans>_pt_<source>...) chosen before the trainer is built, so
        # its run folder is nnU-Net's <Trainer>__<plans>_<variant>__<config> from the start (stock tools find it)
        variant = run_variant(args.pretrained, args.num_train_cases, args.fraction, adapter) \
            if bool(args.pretrained) != bool(args.from_scratch) else None
        trainer = make_trainer(nnPreFineTuneTrainer, fold=args.fold or 0, variant=variant, **common)
        trainer.configure_finetuning(pretrained=args.pretrained, from_scratch=args.from_scratch,
                                     num_train_cases=args.num_train_cases, fraction=args.fraction,
                                     adapter=adapter)
        trainer.seed = args.seed
    else:
        from nnpre_trainers.aliases import nnPreDetectionTrainer

        adapter = _adapter(args)
        trainer = make_trainer(nnPreDetectionTrainer, fold=args.fold or 0, **common,
                               variant=run_variant(args.pretrained, args.num_train_cases, None, adapter))
        trainer.configure_detection(pretrained=args.pretrained, num_train_cases=args.num_train_cases,
                                    adapter=adapter)
        trainer.seed = args.seed
    trainer.overwrite = bool(args.overwrite)
    trainer.amp = args.amp
    trainer.compile_network = {"auto": None, "on": True, "off": False}[args.compile]
    if args.resume:
        from nnpre_trainers.run_folder import finished_checkpoint

        done = finished_checkpoint(trainer.output_folder, trainer.num_epochs)
        if done:
            print(f"already finished: {done} ({trainer.num_epochs} epochs); nothing to do (pass more --epochs "
                  f"to continue, or --overwrite without --c to train again)")
            return 0
        maybe_resume(trainer)
    trainer.run_training()
    if args.command in ("finetune", "detect") and not args.no_validation:
        trainer.perform_actual_validation(False)  # detect: the post-processing sweep -> inference_plan.json
    if trainer.local_rank == 0:
        print(f"done: {trainer.output_folder}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()

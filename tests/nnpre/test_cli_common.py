"""Every command parses without abbreviations and accepts nnU-Net's spellings where they mean the same."""
import argparse
import importlib
import os
import sys

import pytest

from nnpre.errors import NnPreError

COMMANDS = ["challenge", "demo", "evaluate", "export", "plan", "predict", "synth", "train"]
EXAMPLES = ["detection_nndet_format", "finetune_from_nnssl", "predict_challenge", "pretrain_own_folder"]


def _parsers(p: argparse.ArgumentParser):
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _example(name):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    sys.path.insert(0, os.path.abspath(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("name", COMMANDS + EXAMPLES)
def test_every_parser_refuses_abbreviations(name):
    mod = importlib.import_module(f"nnpre.cli.{name}") if name in COMMANDS else _example(name)
    parsers = list(_parsers(mod.build_parser()))
    assert parsers and all(p.allow_abbrev is False for p in parsers)


def test_train_reads_nnunet_spellings(capsys):
    from nnpre.cli.train import build_parser

    p = build_parser()
    a = p.parse_args(["finetune", "-d", "501", "-device", "cpu", "-p", "nnPrePlans__mae", "--from-scratch",
                      "-num_gpus", "1"])
    assert (a.dataset, a.device, a.plans, a.num_gpus) == ("501", "cpu", "nnPrePlans__mae", 1)
    assert p.parse_args(["pretrain", "-d", "502", "-t", "mae", "--device", "mps"]).device == "mps"
    with pytest.raises(SystemExit):  # no abbreviation: --from-scr is not --from-scratch
        p.parse_args(["finetune", "-d", "501", "--from-scr"])
    with pytest.raises(SystemExit):
        p.parse_args(["finetune", "-d", "501", "--from-scratch", "-num_gpus", "2"])
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().err


def test_predict_reads_nnunet_spellings():
    from nnpre.cli.predict import build_parser

    a = build_parser().parse_args(["-i", "in", "-o", "out", "-m", "model", "-chk", "checkpoint_best.pth",
                                   "--disable_tta", "-step_size", "0.75", "-device", "cpu"])
    assert (a.checkpoint, a.no_mirror, a.device) == ("checkpoint_best.pth", True, "cpu")
    assert a.overlap == pytest.approx(0.25)  # nnU-Net's step 0.75 of the patch = 25 % tile overlap
    assert build_parser().parse_args(["-i", "in", "-o", "out", "-m", "model"]).overlap == 0.5


def test_mps_without_an_apple_gpu_is_one_clear_error():
    import torch

    from nnpre_trainers.run import pick_device

    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(NnPreError, match="--device mps was requested"):
        pick_device("mps")

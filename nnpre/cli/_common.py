"""Shared command-line plumbing: friendly errors, thread limits, nnU-Net environment handling."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Optional, Sequence

from nnpre.errors import NnPreError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False`` for every nnpre command.

    With abbreviations on, a prefix of a long option is accepted and nnU-Net habits misparse (``-device cpu``
    was read as ``-d evice``). Sub-command parsers are created with the parent's class, so they inherit it.
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)


#: ``--device`` choices: ``auto`` = CUDA when available, else CPU; ``mps`` = Apple GPUs (as nnU-Net's ``-device``).
DEVICES = ("auto", "cpu", "cuda", "mps")


def add_device_argument(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device`` (also nnU-Net's spelling ``-device``): auto, cpu, cuda or mps."""
    p.add_argument("--device", "-device", default=default, choices=DEVICES,
                   help="auto (CUDA if available, else CPU), cpu, cuda or mps; nnU-Net's -device is accepted")


class StepSizeAction(argparse.Action):
    """nnU-Net's ``-step_size S`` (sliding-window step as a fraction of the patch) stored as overlap ``1 - S``."""

    def __call__(self, parser, namespace, values, option_string=None):
        step = float(values)
        if not 0 < step <= 1:
            parser.error(f"{option_string} must be in (0, 1], got {values}")
        setattr(namespace, self.dest, 1.0 - step)


class NumGpusAction(argparse.Action):
    """nnU-Net's ``-num_gpus``: 1 is accepted; more GPUs run through torchrun (nnpre does not spawn processes)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if int(values) != 1:
            parser.error(f"{option_string} {values}: nnpre trains on several GPUs with torchrun (torchrun "
                         f"--nproc_per_node={values} -m nnpre.cli.train ...); use -num_gpus 1 or leave it out")
        setattr(namespace, self.dest, 1)


def cli_entry(fn: Callable[[argparse.Namespace], int | None], parser_fn: Callable[[], argparse.ArgumentParser]):
    """Wrap a command: parse args, run, turn :class:`NnPreError` into ``error: ...`` and exit status 2."""

    @functools.wraps(fn)
    def main(argv: Optional[Sequence[str]] = None) -> int:
        args = parser_fn().parse_args(argv)
        try:
            rc = fn(args)
        except NnPreError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # permission denied, read-only folder, disk full, ...: one line, not a traceback
            from nnpre.errors import os_error_message

            msg = os_error_message(e)
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        return int(rc or 0)

    return main


def add_root_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None,
                   help="use ROOT/nnUNet_raw, ROOT/nnUNet_preprocessed and ROOT/nnUNet_results instead of the "
                        "nnUNet_* environment variables")


def apply_root(args: argparse.Namespace) -> None:
    if getattr(args, "root", None):
        from nnpre.nnunet_env import use_root

        use_root(args.root)


def triple(kind: type):
    """argparse ``type`` for 1 or 3 numbers ("1" → (1,1,1), "1,1,2" or three args)."""

    def parse(s: str):
        try:
            parts = [kind(x) for x in str(s).replace("x", ",").split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or three comma-separated numbers, got '{s}'")
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected 1 or 3 values, got '{s}'")
        return tuple(parts)

    return parse


def default_num_processes() -> int:
    return max(1, min(int(os.environ.get("nnUNet_def_n_proc", os.cpu_count() or 1)), os.cpu_count() or 1))

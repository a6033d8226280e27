"""Smoke run of the faithful preset end to end, with step-time ratios and peak memory per stage (not part of CI).

Stages, each run through the command users run (console-script ``main`` in a fresh subprocess):

1. ``nnPre_synth``: a labelled set (5 training cases for nnU-Net's 5-fold split, 1 test case), its nnDetection
   copy and a 2-case unlabelled pool;
2. ``nnPre_plan`` of the labelled set and the pool with the faithful preset (1 mm, 128³ patch, ResEnc-L, batch 2;
   ``nnpre/presets.py``);
3. reference: stock nnU-Net ``nnUNetTrainer`` on the labelled set's plans (same network, patch and batch), built
   with ``nnpre_trainers.run.make_trainer``;
4. ``nnPre_train pretrain`` with every registered pretext task (``nnpre_trainers.pretext.list_pretexts()``);
5. ``nnPre_train finetune`` from each pretraining checkpoint (``--no-validation``);
6. ``nnPre_train detect`` (Retina U-Net) from the MAE checkpoint (else the first task's), with its post-processing
   sweep on the validation case (8 mirror variants) on CUDA; on CPU ``--no-validation`` skips the sweep (64
   ResEnc-L forwards at 128³);
7. ``nnPre_predict`` of the test case (no mirroring) and ``nnPre_evaluate det`` against its nnDetection labels.

Training stages run one epoch of ``--iterations`` steps with the ``cpu-tiny`` training *length* (``--preset
cpu-tiny`` of ``nnPre_train`` sets only epochs/iterations/validation iterations; geometry and optimiser come from
the faithful plans). Timing needs no output parsing: the subprocess wraps the trainer's ``train_step`` (the
network step; nnU-Net's loop calls ``next(loader)`` before it) and writes the step times, ``ru_maxrss`` of the
training process (``resource``) and ``torch.cuda.max_memory_allocated`` to a JSON file. The step time of a stage
is the median of its steps after the first (warm-up: allocation, cuDNN autotuning, ``torch.compile``); the ratio
is that over the reference's, measured in the same run.

``--bf16``: on CPU each train step runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the trainers do
not autocast on CPU, as nnU-Net); on CUDA the process' default autocast dtype is set to bfloat16, so the trainers'
own ``torch.autocast("cuda")`` (fp16 in nnU-Net) computes in bf16.

Run::

    python benchmarks/smoke_faithful.py --device cpu --out /tmp/smoke      # tens of minutes on 2 cores
    python benchmarks/smoke_faithful.py --device cuda --bf16 --out /tmp/smoke
    python benchmarks/smoke_faithful.py --quick --tasks mae --out /tmp/q    # cpu-tiny plans: plumbing in a minute
    python benchmarks/smoke_faithful.py --dry-run                           # print the stages and commands

Results: a table on stdout and ``<out>/smoke_faithful.json``. Exit status 1 if any stage failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

LABELLED_ID, POOL_ID = 880, 881
NAME = "SmokeLesions"
REFERENCE = "reference nnUNetTrainer"


# ----------------------------------------------------------------------------------------------------
# Child side: run one console-script main (or the reference) with a timing hook, write stats JSON
# ----------------------------------------------------------------------------------------------------


def _install_hook(stats: dict, device_type: str, bf16: bool) -> None:
    """Wrap every trainer's ``train_step`` (installed in ``nnUNetTrainer.on_train_start``) with a timer."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if bf16 and device_type == "cuda":
        torch.set_autocast_dtype("cuda", torch.bfloat16)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    original = nnUNetTrainer.on_train_start

    def on_train_start(self, *a, **kw):
        out = original(self, *a, **kw)
        step = self.train_step

        def timed_step(batch):
            sync()
            t0 = time.perf_counter()
            if bf16 and self.device.type == "cpu":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    res = step(batch)
            else:
                res = step(batch)
            sync()
            stats["steps"].append(time.perf_counter() - t0)
            return res

        self.train_step = timed_step
        stats["output_folder"] = self.output_folder
        stats["trainer"] = type(self).__name__
        stats["patch_size"] = list(self.configuration_manager.patch_size)
        stats["batch_size"] = int(self.configuration_manager.batch_size)
        return out

    nnUNetTrainer.on_train_start = on_train_start


def _reference_main(argv: List[str]) -> int:
    """Stock ``nnUNetTrainer``: ``dataset plans device epochs iterations`` -> one short training run (fold 0)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnpre_trainers.run import make_trainer

    dataset, plans, device, epochs, iterations = argv
    trainer = make_trainer(nnUNetTrainer, dataset, plans, fold=0, device=device, preset="cpu-tiny",
                           epochs=int(epochs), iterations=int(iterations))
    trainer.run_training()
    return 0


def _child(stats_path: str, bf16: bool, device_type: str, entry: str, argv: List[str]) -> int:
    import resource

    stats: dict = {"entry": entry, "argv": argv, "steps": [], "rc": None}
    if entry in ("nnPre_train", "reference"):
        _install_hook(stats, device_type, bf16)
    if entry == "reference":
        main = _reference_main
    else:
        from importlib.metadata import entry_points

        (ep,) = [e for e in entry_points(group="console_scripts") if e.name == entry]
        main = ep.load()
    t0 = time.perf_counter()
    try:
        rc = main(argv)
        rc = 0 if rc is None else int(rc)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    stats["rc"] = rc
    stats["main_s"] = time.perf_counter() - t0
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    stats["max_rss_mib"] = own.ru_maxrss / 1024.0  # Linux: KiB
    stats["cpu_s"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime  # incl. finished workers
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    return rc


# ----------------------------------------------------------------------------------------------------
# Parent side: the stages
# ----------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    entry: str  # console script name, or "reference"
    argv: List[str]
    needs: List[str] = field(default_factory=list)  # stages that must have succeeded
    rc: Optional[int] = None
    wall_s: Optional[float] = None
    step_s: Optional[float] = None
    n_steps: int = 0
    max_rss_mib: Optional[float] = None
    cpu_s: Optional[float] = None
    cuda_max_allocated_mib: Optional[float] = None
    output_folder: Optional[str] = None
    patch_size: Optional[List[int]] = None
    batch_size: Optional[int] = None
    error: Optional[str] = None

    def command(self) -> str:
        return " ".join([self.entry] + [shlex.quote(a) for a in self.argv])


def _step_time(steps: List[float]) -> Optional[float]:
    """Median over the steps after the first (the first includes warm-up); the only step if there is one."""
    if not steps:
        return None
    return float(statistics.median(steps[1:] if len(steps) > 1 else steps))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast in every train step")
    p.add_argument("--out", default="smoke_faithful_out", help="work folder (nnU-Net folders, results, JSON)")
    p.add_argument("--quick", action="store_true",
                   help="plan with cpu-tiny instead of the faithful preset (plumbing check in about a minute)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated pretext tasks (default: every registered task)")
    p.add_argument("--iterations", type=int, default=2, help="train steps per training stage (default 2)")
    p.add_argument("--fov", type=float, default=None,
                   help="synthetic field of view in mm (default 160: larger than the 128³ patch, so prediction "
                        "slides over several tiles; --quick: 64)")
    p.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage (default: none)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and their commands, run nothing")
    return p


def make_stages(args: argparse.Namespace, out: str, tasks: List[str]) -> List[Stage]:
    """The stage list; checkpoint and model paths are filled in from earlier stages' stats at run time."""
    preset = "cpu-tiny" if args.quick else "gpu"
    fov = args.fov if args.fov is not None else (64.0 if args.quick else 160.0)
    raw = os.path.join(out, "nnUNet_raw")
    det_raw = os.path.join(out, "nndet_raw")
    train = ["--preset", "cpu-tiny", "--epochs", "1", "--iterations", str(args.iterations), "--device", args.device]
    plan = ["-pl", "resenc-l", "--preset", preset] + (["-np", "1"] if args.quick else [])
    stages = [
        Stage("synth", "nnPre_synth", ["--out", raw, "--nndet-out", det_raw, "-d", str(LABELLED_ID), "--name", NAME,
                                       "--n-train", "5", "--n-test", "1", "--n-pool", "2", "--pool-id", str(POOL_ID),
                                       "--fov", str(fov), "--seed", "0"]),
        Stage("plan labelled", "nnPre_plan", ["-d", str(LABELLED_ID)] + plan, needs=["synth"]),
        Stage("plan pool", "nnPre_plan", ["-d", str(POOL_ID)] + plan, needs=["synth"]),
        Stage(REFERENCE, "reference", [str(LABELLED_ID), "nnPreResEncLPlans", args.device, "1", str(args.iterations)],
              needs=["plan labelled"]),
    ]
    for t in tasks:
        stages.append(Stage(f"pretrain {t}", "nnPre_train", ["pretrain", "-d", str(POOL_ID), "-t", t] + train,
                            needs=["plan pool"]))
    for t in tasks:
        stages.append(Stage(f"finetune {t}", "nnPre_train",
                            ["finetune", "-d", str(LABELLED_ID), "--pretrained", f"<checkpoint of pretrain {t}>"]
                            + train + ["--no-validation"], needs=["plan labelled", f"pretrain {t}"]))
    if tasks:
        t = "mae" if "mae" in tasks else tasks[0]
        stages.append(Stage(f"detect {t}", "nnPre_train",
                            ["detect", "-d", str(LABELLED_ID), "--pretrained", f"<checkpoint of pretrain {t}>"] + train
                            + (["--no-validation"] if args.device == "cpu" else []),
                            needs=["plan labelled", f"pretrain {t}"]))
        pred = os.path.join(out, "predictions")
        stages.append(Stage("predict", "nnPre_predict",
                            ["-i", os.path.join(raw, f"Dataset{LABELLED_ID}_{NAME}", "imagesTs"), "-o", pred,
                             "-m", f"<model of detect {t}>", "--no-mirror", "--device", args.device],
                            needs=[f"detect {t}"]))
        stages.append(Stage("evaluate", "nnPre_evaluate",
                            ["det", "-p", pred, "-g", os.path.join(det_raw, f"Task{LABELLED_ID}_{NAME}", "raw_splitted",
                                                                   "labelsTs"),
                             "-o", os.path.join(out, "evaluation", "det.json"), "--no-plots"], needs=["predict"]))
    return stages


def _resolve(argv: List[str], done: Dict[str, Stage]) -> List[str]:
    """Replace ``<checkpoint of STAGE>`` / ``<model of STAGE>`` by that stage's trainer output."""
    out = []
    for a in argv:
        if a.startswith("<checkpoint of "):
            a = os.path.join(done[a[len("<checkpoint of "):-1]].output_folder, "checkpoint_final.pth")
        elif a.startswith("<model of "):
            a = done[a[len("<model of "):-1]].output_folder
        out.append(a)
    return out


def run_stage(stage: Stage, args: argparse.Namespace, out: str, env: dict, done: Dict[str, Stage]) -> None:
    stage.argv = _resolve(stage.argv, done)
    stats_path = os.path.join(out, "stats", stage.name.replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(stats_path), exist_ok=True)
    log_path = os.path.join(out, "logs", stage.name.replace(" ", "_") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", stats_path, "1" if args.bf16 else "0", args.device,
           stage.entry, *stage.argv]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.stage_timeout)
            stage.rc = proc.returncode
        except subprocess.TimeoutExpired:
            stage.rc, stage.error = 124, f"timed out after {args.stage_timeout} s"
    stage.wall_s = time.perf_counter() - t0
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            st = json.load(f)
        stage.n_steps = len(st["steps"])
        stage.step_s = _step_time(st["steps"])
        stage.max_rss_mib = st.get("max_rss_mib")
        stage.cpu_s = st.get("cpu_s")
        stage.cuda_max_allocated_mib = st.get("cuda_max_allocated_mib")
        stage.output_folder = st.get("output_folder")
        stage.patch_size, stage.batch_size = st.get("patch_size"), st.get("batch_size")
    if stage.rc != 0 and stage.error is None:
        with open(log_path) as f:
            tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-1:]
        stage.error = f"exit status {stage.rc}: {tail[0] if tail else 'no output'} (log: {log_path})"


def _fmt(v: Optional[float], spec: str) -> str:
    return "--" if v is None else format(v, spec)


def report(stages: List[Stage], args: argparse.Namespace) -> str:
    ref = next((s for s in stages if s.name == REFERENCE), None)
    ref_step = ref.step_s if ref is not None else None
    geo = (f"patch {ref.patch_size}, batch {ref.batch_size}" if ref is not None and ref.patch_size else "")
    lines = [f"smoke run ({'cpu-tiny plans, --quick' if args.quick else 'faithful preset'}), device {args.device}"
             f"{', bf16 autocast' if args.bf16 else ''}, {args.iterations} steps per training stage; {geo}",
             f"step = median train_step after the first; ratio = step / {REFERENCE} step (same run, same plans)",
             f"  {'stage':28s} {'status':>6s} {'wall s':>8s} {'steps':>5s} {'step s':>8s} {'ratio':>6s} "
             f"{'RSS MiB':>8s} {'CUDA MiB':>9s}"]
    for s in stages:
        status = "ok" if s.rc == 0 else ("skip" if s.rc is None else "FAIL")
        ratio = s.step_s / ref_step if s.step_s is not None and ref_step else None
        lines.append(f"  {s.name:28s} {status:>6s} {_fmt(s.wall_s, '8.1f')} {s.n_steps:5d} {_fmt(s.step_s, '8.3f')} "
                     f"{_fmt(ratio, '6.2f')} {_fmt(s.max_rss_mib, '8.0f')} {_fmt(s.cuda_max_allocated_mib, '9.0f')}")
    for s in stages:
        if s.error:
            lines.append(f"  {s.name}: {s.error}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:  # internal: one stage inside its own process (see run_stage)
        stats_path, bf16, device, entry, *rest = argv[1:]
        return _child(stats_path, bf16 == "1", device, entry, rest)
    args = build_parser().parse_args(argv)
    if args.tasks is None:
        from nnpre_trainers.pretext import list_pretexts

        tasks = list(list_pretexts())
    else:
        tasks = [t for t in args.tasks.split(",") if t]
    out = os.path.abspath(args.out)
    stages = make_stages(args, out, tasks)
    if args.dry_run:
        for s in stages:
            print(f"{s.name}: {s.command()}")
        return 0
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=os.path.join(out, "nnUNet_raw"),
               nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(out, "nnUNet_results"))
    env.setdefault("nnUNet_n_proc_DA", "1")
    done: Dict[str, Stage] = {}
    for s in stages:
        missing = [n for n in s.needs if n not in done or done[n].rc != 0]
        if missing:
            s.error = f"skipped: {', '.join(missing)} did not succeed"
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {s.name}: {s.command()}", flush=True)
            run_stage(s, args, out, env, done)
        done[s.name] = s
    text = report(stages, args)
    print(text)
    with open(os.path.join(out, "smoke_faithful.json"), "w") as f:
        json.dump({"args": vars(args), "tasks": tasks,
                   "stages": [asdict(s) for s in stages], "report": text}, f, indent=1)
    return 0 if all(s.rc == 0 for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())

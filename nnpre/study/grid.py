"""The study grid as data: methods × adapters × labelled-set sizes × seeds, training lengths per preset, a time
estimate.

A *study* pretrains one encoder per pretext method on an unlabelled pool, then fine-tunes every checkpoint
(and a from-scratch baseline) for segmentation (nnU-Net) and detection (Retina U-Net) on labelled subsets of
several sizes, one run per seed, and evaluates each run on a held-out test set. :class:`StudyGrid` lists the
runs, :class:`StudyBudget` holds the lengths, :func:`estimate` predicts the time from stated step times
(:data:`STEP_TIMES`).

Each pretrained checkpoint is fine-tuned once per *adapter* of the grid (``nnpre_trainers.adapters``: ``full``
fine-tuning, ``lora``, ``molre``, ``probe-linear``, ``probe-mlp``); such a (method, adapter) pair is an *arm*,
labelled ``mae`` for full fine-tuning and ``mae+lora`` otherwise. Scratch always trains fully (an adapter on a
random encoder has nothing to adapt). The default ``adapters=("full",)`` is the study before adapters existed:
same runs, stage names and run folders.

Method names are the pretext registry's (``nnpre_trainers.pretext.registry.list_pretexts()``) in their short
form (``nnpre_trainers.aliases.short_name``: ``model_genesis`` is ``mg``, as in run folders, stage records and
reports); registry names are accepted too. ``all`` means every registered task.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from nnpre.errors import fail

#: Fine-tuning tasks: nnU-Net segmentation and Retina U-Net detection.
TASKS: Tuple[str, ...] = ("seg", "det")
#: Default pretext methods of the study. Fewer than ``all`` registered tasks to keep the default run inside
#: its time budget (each extra method adds one pretraining and 2 × sizes × seeds fine-tuning runs);
#: ``--methods all`` runs every registered task.
DEFAULT_METHODS: Tuple[str, ...] = ("mae", "mg", "diffusion")
#: Default labelled-set sizes.
DEFAULT_LABELLED: Tuple[int, ...] = (2, 8)
#: Run seed of the pretraining runs (network initialisation and pretext data streams): the trainer's default,
#: so a study pretraining equals a default ``nnPre_train pretrain`` run.
PRETRAIN_SEED = 12345
#: Fine-tuning run with seed index ``s`` initialises its network under ``FINETUNE_SEED_BASE + s``.
FINETUNE_SEED_BASE = 100
#: Validation iterations per epoch in every study run (nnU-Net: 50; the study only logs the loss).
VAL_ITERATIONS = 2
#: Default adapters: full fine-tuning only (the study before adapters).
DEFAULT_ADAPTERS: Tuple[str, ...] = ("full",)
#: Adapters that cannot train a Retina U-Net, with the reason: their detection arms are skipped with a note
#: (``nnpre_trainers/adapters/probe.py`` refuses probe-mlp on detectors: the UFPN decoder is already a linear
#: probe of the encoder features, which probe-linear trains).
DETECTION_UNSUPPORTED: Dict[str, str] = {
    "probe-mlp": "the Retina U-Net's UFPN decoder is already a linear probe of the encoder (use probe-linear)",
}


def registry_name(method: str) -> str:
    """Pretext registry name of a study method (``mg`` → ``model_genesis``; the aliases' short names)."""
    from nnpre_trainers.aliases import resolve_pretext

    return resolve_pretext(method)


def study_name(registry: str) -> str:
    """Study name of a registered pretext task: its short name (``model_genesis`` → ``mg``)."""
    from nnpre_trainers.aliases import short_name

    return short_name(registry)


def available_methods() -> List[str]:
    """Every registered pretext task as a study name: the defaults first, then the others sorted."""
    from nnpre_trainers.pretext import list_pretexts

    names = [study_name(n) for n in list_pretexts()]
    return [m for m in DEFAULT_METHODS if m in names] + sorted(m for m in names if m not in DEFAULT_METHODS)


def parse_methods(spec: str) -> Tuple[str, ...]:
    """``"mae,mg"`` / ``"all"`` → study method names (registry names are accepted too); unknown → error."""
    known = available_methods()
    if spec.strip() == "all":
        return tuple(known)
    aliases = {registry_name(m): m for m in known}
    methods: List[str] = []
    for m in (s.strip() for s in spec.split(",")):
        m = aliases.get(m, m)
        if m and m not in methods:
            methods.append(m)
    unknown = [m for m in methods if m not in known]
    if unknown:
        fail(f"unknown pretext method(s) {unknown}; choose from {', '.join(known)} (or 'all')")
    if not methods:
        fail("--methods is empty; name at least one pretext task (or 'all')")
    return tuple(methods)


def parse_adapters(spec: str) -> Tuple[str, ...]:
    """``"full,lora"`` → adapter names of ``nnpre_trainers.adapters`` (order kept, duplicates dropped); unknown
    or empty → one-line error listing the registered adapters."""
    from nnpre_trainers.adapters import list_adapters

    known = list_adapters()
    names: List[str] = []
    for a in (s.strip() for s in str(spec).split(",")):
        if a and a not in names:
            names.append(a)
    unknown = [a for a in names if a not in known]
    if unknown:
        fail(f"unknown adapter(s) {unknown}; choose from {', '.join(known)} (comma separated, e.g. full,lora)")
    if not names:
        fail(f"--adapters is empty; name at least one of {', '.join(known)}")
    return tuple(names)


def detection_skip_reason(adapter: str) -> Optional[str]:
    """Why ``adapter`` gets no detection arm (None: it can train a Retina U-Net); see
    :data:`DETECTION_UNSUPPORTED`."""
    return DETECTION_UNSUPPORTED.get(adapter)


def arm_label(method: str, adapter: str = "full") -> str:
    """Table / legend label of an arm: ``mae`` (full fine-tuning, and scratch) or ``mae+lora``."""
    return method if adapter == "full" else f"{method}+{adapter}"


def parse_labelled(spec: str, n_train: int) -> Tuple[int, ...]:
    """``"2,8"`` → sorted unique sizes, each between 1 and ``n_train``."""
    try:
        sizes = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    except ValueError:
        fail(f"--labelled expects comma-separated integers, got '{spec}'")
    if not sizes or min(sizes) < 1 or max(sizes) > n_train:
        fail(f"--labelled sizes must be between 1 and the {n_train} labelled training cases, got {sizes}")
    return tuple(sizes)


@dataclass(frozen=True)
class StudyBudget:
    """Training lengths (epochs × iterations per epoch) and synthetic data sizes of a study.

    Attributes:
        pretrain_epochs, pretrain_iterations: each pretraining run.
        finetune_epochs, finetune_iterations: each segmentation fine-tuning run.
        n_train, n_test, n_pool: labelled training cases, held-out test cases, unlabelled pool cases.
        difficulty: synthetic difficulty (``nnpre.synthetic`` presets).
        detect_epochs, detect_iterations: each Retina U-Net fine-tuning run.
    """

    pretrain_epochs: int
    pretrain_iterations: int
    finetune_epochs: int
    finetune_iterations: int
    n_train: int
    n_test: int
    n_pool: int
    difficulty: str
    detect_epochs: int
    detect_iterations: int

    def with_overrides(self, **kw) -> "StudyBudget":
        """Copy with the non-``None`` keyword overrides applied."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


BUDGETS: Dict[str, StudyBudget] = {
    # ~13 min on 2 cores (measured; see README). Synthetic "cpu" difficulty ("medium" confounders, lesions
    # scaled to the 2 mm grid): scratch segmentation with the cpu-tiny recipe (AdamW, see nnpre.presets) for
    # 6x45 iterations reached test Dice 0.37-0.43 with 8 labelled cases and 0.20-0.30 with 2 (3 seeds, 8 test
    # cases), whereas on "medium" it plateaued at ~0.25 with either (only lung nodules were learned) and
    # "easy" saturates (0.91 / 0.88). Detection: 6x50 = 300 iterations, the length at which
    # benchmarks/bench_detection_learning.py compares the Retina U-Net with segmentation components (ratio 1.19
    # over 5 seeds); with 4x32 the default demo's scratch AP@0.1 with 8 labels was 0.43-0.59 over two releases.
    # A detection run's training takes ~35 s there (8 it/s), so this adds ~3 min to the demo.
    "cpu-tiny": StudyBudget(3, 80, 6, 45, 8, 8, 12, "cpu", 6, 50),
    # Faithful geometry (1 mm, 128³, ResEnc-L, batch 2) at lengths a GPU user can afford: the default grid
    # (3 methods, sizes 2 and 8, one seed) is estimated at ~6.9 h on one A100-class GPU (see STEP_TIMES and
    # `nnPre_demo --preset gpu --dry-run`); 5,000 pretraining steps are 2 % of nnssl's 250k and 2,000
    # fine-tuning steps 0.8 % of nnU-Net's 1000 × 250, so this is a short-schedule study, not the papers'.
    # Detection gets 10 x 250: on the faithful network its step costs about a segmentation step (STEP_TIMES),
    # and the detector needs more iterations than segmentation to learn (benchmarks/bench_detection_learning.py).
    "gpu": StudyBudget(20, 250, 8, 250, 40, 20, 200, "default", 10, 250),
}


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid: ``task`` (seg/det), ``method`` (``scratch`` or a pretext), labelled-set
    size, seed index and ``adapter`` (``nnpre_trainers.adapters`` name; ``full`` = every parameter trains)."""

    task: str
    method: str
    labelled: int
    seed: int
    adapter: str = "full"

    @property
    def tag(self) -> str:
        """Plans variant of the run folder (``<Trainer>__nnPreResEncLPlans_<tag>__3d_fullres``), e.g.
        ``mae_n2_s0``; non-full adapters append ``_<adapter>`` (``mae_n2_s0_lora``) so folders never collide."""
        suffix = "" if self.adapter == "full" else f"_{self.adapter}"
        return f"{self.method}_n{self.labelled}_s{self.seed}{suffix}"

    @property
    def name(self) -> str:
        """Stage / record name, e.g. ``seg_mae_n2_s0`` or ``seg_mae_n2_s0_lora``."""
        return f"{self.task}_{self.tag}"

    @property
    def arm(self) -> str:
        """Row label in the report (:func:`arm_label`): ``scratch``, ``mae``, ``mae+lora``."""
        return arm_label(self.method, self.adapter)

    @property
    def init_seed(self) -> int:
        """Seed of the network initialisation of this run."""
        return FINETUNE_SEED_BASE + self.seed


@dataclass(frozen=True)
class StudyGrid:
    """Which runs a study makes: pretext ``methods`` (study names), ``labelled`` sizes, ``seeds`` per
    configuration, fine-tuning ``tasks`` and the ``adapters`` each pretrained method is fine-tuned with
    (registry names, see the module doc; unknown names stop with one line)."""

    methods: Tuple[str, ...] = DEFAULT_METHODS
    labelled: Tuple[int, ...] = DEFAULT_LABELLED
    seeds: int = 1
    tasks: Tuple[str, ...] = TASKS
    adapters: Tuple[str, ...] = DEFAULT_ADAPTERS

    def __post_init__(self):
        if self.seeds < 1:
            fail("--seeds must be >= 1")
        if tuple(self.adapters) != DEFAULT_ADAPTERS:
            object.__setattr__(self, "adapters", parse_adapters(",".join(self.adapters)))

    @property
    def all_methods(self) -> List[str]:
        """``scratch`` followed by the pretext methods."""
        return ["scratch", *self.methods]

    def arms(self, task: str) -> List[Tuple[str, str]]:
        """(method, adapter) pairs trained for ``task``: scratch (full), then each method with each adapter
        (adapters without detection support are left out of ``det``)."""
        pairs = [("scratch", "full")]
        for m in self.methods:
            pairs += [(m, a) for a in self.adapters if task != "det" or detection_skip_reason(a) is None]
        return pairs

    def arm_labels(self, task: str) -> List[str]:
        """Report rows of ``task`` (:func:`arm_label`), e.g. ``["scratch", "mae", "mae+lora"]``."""
        return [arm_label(m, a) for m, a in self.arms(task)]

    def skipped(self) -> List[str]:
        """One note per adapter whose arms a task leaves out (printed by ``nnPre_demo`` and ``--dry-run``)."""
        notes = []
        if "det" in self.tasks and self.methods:
            for a in self.adapters:
                why = detection_skip_reason(a)
                if why is not None:
                    notes.append(f"note: no detection arms for adapter {a}: {why}")
        return notes

    def runs(self) -> List[Run]:
        """Fine-tuning runs in execution order: task, labelled size, seed, then arm (scratch first, then each
        method with each adapter in the given order)."""
        return [Run(t, m, n, s, a) for t in self.tasks for n in self.labelled for s in range(self.seeds)
                for m, a in self.arms(t)]


@dataclass(frozen=True)
class StepTimes:
    """Stated step costs of a preset, for :func:`estimate`.

    Attributes:
        seg_step_s: seconds per nnU-Net segmentation training step (the reference step).
        source: where ``seg_step_s`` comes from.
        pretrain_ratio: pretraining step / segmentation step on the same network and patch.
        detect_ratio: Retina U-Net step / segmentation step.
        val_ratio: one validation iteration (forward only) / training step.
        eval_per_case: test-set evaluation per case (sliding-window prediction + metrics), in steps.
    """

    seg_step_s: float
    source: str
    #: the bound ``benchmarks/bench_pretrain_step.py`` enforces for every pretraining trainer vs a stock
    #: nnU-Net supervised step (its TARGET_RATIO)
    pretrain_ratio: float = 1.05
    #: ``benchmarks/bench_detection_step.py`` (cpu-tiny network and detector, CPU time): 1.67
    detect_ratio: float = 1.67
    #: forward ≈ 1/3 of forward + backward
    val_ratio: float = 1.0 / 3.0
    #: one 128³ tile per synthetic case (96 mm cube) plus reading, metrics and writing; nominal
    eval_per_case: float = 1.0


STEP_TIMES: Dict[str, StepTimes] = {
    # nnU-Net ResEnc-L: "~35 h on A100" per training of 1000 × 250 iterations (run time measured on one Nvidia
    # A100 PCIe 40GB; nnU-Net documentation/resenc_presets.md, from Isensee et al. 2024, "nnU-Net Revisited",
    # arXiv 2404.09556) = 0.50 s per iteration, validation and data loading included. Its patches are the L
    # planner's (24 GB target; at least 128³ on those datasets), so a 128³ step is at most that; newer GPUs
    # (H100) are faster.
    # detect_ratio: ``bench_detection_step.py --network resenc-l --preset gpu --patch 64`` (ResEnc-L, nnDetection's
    # detector with levels from stride 4, CPU time): 0.87; the CPU smoke run at 128³ gave 0.88 (benchmarks/
    # smoke_faithful.py). Not measured on a GPU.
    "gpu": StepTimes(0.50, "nnU-Net ResEnc-L trains 1000x250 iterations in ~35 h on one A100 "
                           "(nnU-Net documentation/resenc_presets.md) = 0.50 s/step", detect_ratio=0.87),
    # cpu-tiny demo on 2 cores (2026-12-01, quiet machine): a segmentation epoch of 45 iterations + validation took
    # 3.4-3.6 s in the trainer logs, ~13 it/s (earlier releases: 7 it/s)
    "cpu-tiny": StepTimes(1.0 / 13.0, "cpu-tiny demo logs on 2 CPU cores: 13 segmentation it/s"),
}


@dataclass
class Estimate:
    """Estimated cost per stage (in reference-step equivalents and seconds) and in total."""

    steps: Dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0

    @property
    def seconds(self) -> Dict[str, float]:
        return {k: v * self.step_s for k, v in self.steps.items()}

    @property
    def total_s(self) -> float:
        return sum(self.steps.values()) * self.step_s


def run_steps(task: str, budget: StudyBudget, times: StepTimes, n_test: Optional[int] = None) -> float:
    """Reference-step equivalents of one run: ``task`` ∈ {"pretrain", "seg", "det"} (training, validation and,
    for fine-tuning, the test-set evaluation)."""
    n_test = budget.n_test if n_test is None else n_test
    if task == "pretrain":
        e, i, r, ev = budget.pretrain_epochs, budget.pretrain_iterations, times.pretrain_ratio, 0.0
    elif task == "seg":
        e, i, r, ev = budget.finetune_epochs, budget.finetune_iterations, 1.0, n_test * times.eval_per_case
    elif task == "det":
        e, i, r, ev = budget.detect_epochs, budget.detect_iterations, times.detect_ratio, n_test * times.eval_per_case
    else:
        raise ValueError(f"unknown task {task!r}")
    return e * i * r + e * VAL_ITERATIONS * times.val_ratio * r + ev


def estimate(grid: StudyGrid, budget: StudyBudget, times: StepTimes) -> Estimate:
    """Time of every training stage of the study (data generation and planning not included)."""
    est = Estimate(step_s=times.seg_step_s)
    for m in grid.methods:
        est.steps[f"pretrain_{m}"] = run_steps("pretrain", budget, times)
    for r in grid.runs():
        est.steps[r.name] = run_steps(r.task, budget, times)
    return est


def format_duration(seconds: float) -> str:
    """``4520`` → ``"1 h 15 min"``; under an hour ``"12.5 min"``."""
    if seconds >= 3600:
        h, rest = divmod(int(round(seconds / 60.0)), 60)
        return f"{h} h {rest} min"
    return f"{seconds / 60.0:.1f} min"


def _per_adapter(runs: List[Run]) -> str:
    """``"scratch 2, full 4, lora 4"``: how many of ``runs`` each arm kind has."""
    counts: Dict[str, int] = {}
    for r in runs:
        k = "scratch" if r.method == "scratch" else r.adapter
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def describe(grid: StudyGrid, budget: StudyBudget, preset: str, times: Optional[StepTimes] = None) -> str:
    """Human-readable grid, arms, iterations per run and estimated time (what ``nnPre_demo --dry-run`` prints)."""
    times = times or STEP_TIMES[preset]
    est = estimate(grid, budget, times)
    runs = grid.runs()
    per_task = {t: [r for r in runs if r.task == t] for t in grid.tasks}
    pre_it = budget.pretrain_epochs * budget.pretrain_iterations
    lines = [
        f"nnPre study, preset '{preset}'",
        f"  methods: {', '.join(grid.methods)} (+ scratch); labelled sizes: "
        f"{', '.join(map(str, grid.labelled))}; seeds: {grid.seeds}",
        f"  adapters: {', '.join(grid.adapters)} (one arm per pretrained method and adapter; scratch trains fully)",
        f"  data: {budget.n_train} labelled, {budget.n_test} test, {budget.n_pool} pool cases, "
        f"difficulty '{budget.difficulty}'",
        f"  pretraining: {len(grid.methods)} run(s) x {budget.pretrain_epochs}x{budget.pretrain_iterations} = "
        f"{pre_it} iterations",
    ]
    several = tuple(grid.adapters) != DEFAULT_ADAPTERS
    for t, label, e, i in (("seg", "segmentation", budget.finetune_epochs, budget.finetune_iterations),
                           ("det", "detection", budget.detect_epochs, budget.detect_iterations)):
        if t in per_task:
            lines.append(f"  {label} fine-tuning: {len(per_task[t])} run(s) x {e}x{i} = {e * i} iterations"
                         + (f" ({_per_adapter(per_task[t])})" if several else ""))
            if several:
                lines.append(f"    arms: {', '.join(grid.arm_labels(t))}")
    lines += [f"  {n}" for n in grid.skipped()]
    secs = est.seconds
    pre_s = sum(v for k, v in secs.items() if k.startswith("pretrain_"))
    lines += [
        "  estimated time (training + test evaluation; data generation and planning not included): "
        f"{format_duration(est.total_s)}",
        f"    pretraining {format_duration(pre_s)}, "
        + ", ".join(f"{t} {format_duration(sum(secs[r.name] for r in per_task[t]))}" for t in grid.tasks),
    ]
    if several:
        adapter_s = sum(secs[r.name] for r in runs if r.method != "scratch" and r.adapter != "full")
        lines.append(f"    of which adapter arms (not full, not scratch): {format_duration(adapter_s)}")
    lines.append(
        f"  assumptions: {times.source}; pretraining step = {times.pretrain_ratio:g}x, detection step = "
        f"{times.detect_ratio:g}x a segmentation step; validation iteration = {times.val_ratio:.2f}x; "
        f"{times.eval_per_case:g} step(s) per test case"
        + ("; an adapter arm step = a full fine-tuning step (probes skip the encoder's backward pass and cost "
           "less; LoRA / MoLRE add low-rank convolutions and may cost more)" if several else ""))
    return "\n".join(lines)

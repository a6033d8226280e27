"""The one nnU-Net trainer of nnpre: composes a task, an optional encoder transfer, an adapter and a schedule.

:class:`nnPreTrainer` is an ``nnUNetTrainer`` with the exact nnU-Net constructor signature (so
``nnUNetv2_train -tr NAME`` and checkpoints' ``init_args`` keep working). What is learnt comes from injected,
separately tested parts (:meth:`nnPreTrainer.compose`):

* **task** (:class:`nnpre_trainers.tasks.base.TrainingTask`): builds the network, provides the loaders, turns a
  batch into tensors and losses, validates, adds checkpoint entries — a pretext task
  (:class:`~nnpre_trainers.tasks.pretext.PretextTrainingTask`), ``segmentation``
  (:class:`~nnpre_trainers.tasks.segmentation.SegmentationTask`) or ``detection``
  (:class:`nnpre_detection.task.DetectionTask`);
* **transfer** (:class:`~nnpre_trainers.transfer_step.EncoderTransfer`, optional): run once on the new network
  of a new run; its report is saved in the run folder and in every checkpoint, so ``--c`` never redoes it;
* **adapter** (optional; any object with ``apply(network) -> None``, e.g. from ``nnpre_trainers.adapters``):
  applied after the transfer and before the optimizer is built (also on resume, before the weights load); if it
  has ``is_trainable(name)``, only parameters it accepts enter the stage optimizers (intersected with the
  stage's groups); its name and ``options()`` are recorded in checkpoints (``nnpre_run.adapter``);
* **schedule** (:class:`~nnpre_trainers.finetune_schedule.FinetuneSchedule`): stages, trained parameter groups
  and per-iteration LR, applied by :class:`~nnpre_trainers.stage_controller.StageController` (one optimizer
  per stage, built when the stage's first iteration starts). Default: the task's recipe — nnU-Net's poly SGD
  for pretraining (:func:`~nnpre_trainers.finetune_schedule.pretrain_schedule`), the DKFZ fine-tuning recipe
  with a transfer, nnU-Net's from-scratch schedule without (:func:`~nnpre_trainers.finetune_schedule.default_schedule`).

Every task shares one optimisation step (:func:`nnpre_trainers.train_step.train_step`: AMP, the schedule's gradient
clip — nnU-Net's 12 unless the schedule says otherwise —, step). A task may also set, as data, the run's default
length (``training_length``), schedule (``default_schedule``) and foreground oversampling
(``foreground_oversampling``) — detection does, from nnDetection's recipe — and pick ``checkpoint_best`` by its
own validation metric through :meth:`nnPreTrainer.end_loss_epoch` / :meth:`nnPreTrainer.select_best` (the best
value is kept in checkpoints and restored on ``--c``).
Plumbing kept from nnU-Net and extended: training length from the preset recorded in the plans; DDP also on
CPU (gloo); atomic checkpoints holding plain values only, read with ``weights_only=True``; a tqdm bar per
epoch; seeded, reproducible loaders (:mod:`nnpre_trainers.loaders`). No setting comes from environment
variables: stock ``nnUNetv2_train -tr <alias>`` runs the alias's default task from scratch.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class as _nnunet_infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nnpre.architecture import unwrap
from nnpre.atomic import write_json
from nnpre.checkpoints import safe_load, save_checkpoint_atomic, strip_prefixes
from nnpre.errors import fail
from nnpre.presets import preset_from_plans
from nnpre_trainers.finetune_schedule import FinetuneSchedule, default_schedule, parameter_groups, pretrain_schedule
from nnpre_trainers.loaders import start_augmenters
from nnpre_trainers.run_folder import RunLock, finished_checkpoint, remove_stale_temp_files
from nnpre_trainers.stage_controller import StageController
from nnpre_trainers.tasks.base import TaskContext, TrainingTask, get_task
from nnpre_trainers.train_step import amp_dtype, make_grad_scaler, train_step
from nnpre_trainers.transfer_step import EncoderTransfer

#: Seed of the few-label subset permutation (nnU-Net's split seed).
SUBSET_SEED = 12345
#: Default run seed (network init, loaders); ``nnPre_train --seed`` overrides it.
DEFAULT_SEED = 12345


def infer_dataset_class(folder: str):
    """nnU-Net's dataset class of a preprocessed folder; nnpre's completion record (a ``.json`` next to the cases)
    does not count as a case format."""
    try:
        return _nnunet_infer_dataset_class(folder)
    except AssertionError:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        if any(n.endswith(".b2nd") for n in os.listdir(folder)):
            return nnUNetDatasetBlosc2
        raise


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays → Python values, recursively (so checkpoints load with weights_only=True)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def improves(value: float, best: Optional[float], mode: str = "min") -> bool:
    """Whether a validation ``value`` beats ``best`` (``mode`` ``"min"``: lower is better, ``"max"``: higher);
    NaN never does; anything non-NaN beats no best (None or NaN)."""
    if mode not in ("min", "max"):
        fail(f"a monitored metric's mode must be 'min' or 'max', got {mode!r}")
    value = float(value)
    if value != value:
        return False
    if best is None or best != best:
        return True
    return value < best if mode == "min" else value > best


def pretrained_tag(path: str) -> str:
    """Short run-folder name of a pretrained checkpoint.

    nnU-Net-style ``.../<Trainer>__<Plans>__<cfg>/fold_X/checkpoint_final.pth`` → ``<Trainer>``; any other file
    → its name without extension (``/data/openmind_mae.pth`` → ``openmind_mae``).
    """
    stem = os.path.basename(path)
    for ext in (".pth", ".pt", ".ckpt"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if stem.startswith("checkpoint_") and (parent.startswith("fold_") or parent == "fold_all"):
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path)))).split("__")[0] or stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "pretrained"


#: Key of the record a variant plans file carries (:func:`variant_plans`).
VARIANT_KEY = "nnpre_variant"


def run_variant(pretrained: Optional[str] = None, num_train_cases: Optional[int] = None,
                fraction: Optional[float] = None, adapter=None) -> str:
    """Default variant name of a fine-tuning / detection run: ``scratch`` or ``pt_<source>``
    (:func:`pretrained_tag`) [+ ``_n<N>`` / ``_f<fraction>``] [+ ``_<adapter>`` unless ``full``]."""
    tag = "pt_" + pretrained_tag(pretrained) if pretrained else "scratch"
    if num_train_cases is not None:
        tag += f"_n{num_train_cases}"
    elif fraction is not None:
        tag += f"_f{fraction:g}"
    if adapter is not None and getattr(adapter, "name", "full") != "full":
        tag += "_" + adapter.name
    return tag


def variant_plans_name(base: str, variant: str) -> str:
    """Plans identifier ``<base>_<variant>`` of a run variant, without ``__``.

    nnU-Net 2.8.1 splits a run folder name on ``__`` into exactly (trainer, plans, configuration)
    (``file_path_utilities.convert_identifier_to_trainer_plans_config``, used by ``nnUNetv2_find_best_configuration``
    and ``parse_dataset_trainer_plans_configuration_from_path``), so runs of a ``__`` identifier (nnU-Net
    master's ``ptPlans__NAME``, our ``nnPrePlans__<checkpoint>``) would not be found: ``__`` becomes ``_`` and
    characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``.
    """
    raw = f"{base}_{variant}" if variant else base
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)
    while "__" in name:
        name = name.replace("__", "_")
    return name.strip("_") or "plans"


def variant_plans(plans: dict, variant: str) -> dict:
    """A copy of ``plans`` for run variant ``variant`` (same configurations and data identifiers, so the
    preprocessed data is shared): ``plans_name`` = :func:`variant_plans_name` of the base plans, and the record
    ``nnpre_variant = {base_plans, variant[, pretrain_info]}``. The base's ``pretrain_info`` moves into the record,
    so ``nnPre_train --pretrained`` still finds exactly one plans file written for a checkpoint. Plans that already
    are a variant are re-derived from their base (variants never stack)."""
    out = copy.deepcopy(plans)
    record = out.pop(VARIANT_KEY, None) or {}
    base = record.get("base_plans") or out["plans_name"]
    info = out.pop("pretrain_info", None) or record.get("pretrain_info")
    out["plans_name"] = variant_plans_name(base, variant)
    out[VARIANT_KEY] = {"base_plans": base, "variant": variant, **({"pretrain_info": info} if info else {})}
    return out


def write_variant_plans(plans: dict, folder: str) -> str:
    """Write ``plans`` (from :func:`variant_plans`) as ``<folder>/<plans_name>.json`` (atomic; unchanged files
    are not rewritten) so stock ``nnUNetv2_predict -p`` / ``nnUNetv2_find_best_configuration -p`` find it next to
    the base plans. Returns the path."""
    path = join(folder, plans["plans_name"] + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f) == plans:
                return path
    except (OSError, ValueError):
        pass
    write_json(plans, path)
    return path


class nnPreTrainer(nnUNetTrainer):
    """One trainer for pretraining, fine-tuning and detection (see the module doc).

    Class attributes (set by the named aliases in :mod:`nnpre_trainers.aliases`): ``task_name`` (a fine-tuning
    task of :func:`~nnpre_trainers.tasks.base.get_task`) or ``pretext_name`` (a pretext task of
    :func:`~nnpre_trainers.pretext.registry.get_pretext`) — the task used when :meth:`compose` gives none.
    """

    task_name: ClassVar[str] = "segmentation"
    pretext_name: ClassVar[Optional[str]] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and (device.type == "cpu" or not torch.cuda.is_available()):
            # nnU-Net forces cuda:<rank> under DDP; gloo on CPU needs the CPU device and no grad scaler.
            self.device = torch.device("cpu")
            self.grad_scaler = None
        self.task: Optional[TrainingTask] = None
        self.use_preset(preset_from_plans(self.plans_manager.plans))  # make_trainer(preset=...) calls it again
        self.enable_deep_supervision = False
        self.show_progress = True
        self.iteration_in_epoch = 0
        self.seed = DEFAULT_SEED
        self.transfer: Optional[EncoderTransfer] = None
        self.adapter = None
        self.schedule: Optional[FinetuneSchedule] = None
        self.stages: Optional[StageController] = None
        self.transfer_record: Optional[Dict[str, Any]] = None
        self.num_train_cases: Optional[int] = None
        self.fraction: Optional[float] = None
        self._restoring = False
        self._resume_stage: Optional[int] = None
        self._resumed = False
        # checkpoint_best's metric: {"key", "mode", "value", "epoch"} of the best epoch so far (select_best)
        self.best_metric: Dict[str, Any] = {}
        self.overwrite = False  # True: a new run may replace a finished one (nnPre_train --overwrite)
        # Mixed precision (nnpre_trainers.train_step.amp_dtype): "auto" = nnU-Net's (fp16 + GradScaler on CUDA,
        # fp32 on CPU), "off", "fp16" (CUDA), "bf16". nnPre_train --amp.
        self.amp = "auto"
        # torch.compile: None = nnU-Net's rule (_do_i_compile: on for CUDA unless nnUNet_compile is false, never on
        # CPU); True / False force it (True also compiles on CPU). nnPre_train --compile.
        self.compile_network: Optional[bool] = None
        self._lock: Optional[RunLock] = None

    # -- composition -----------------------------------------------------------------------------------------
    def use_preset(self, preset) -> None:
        """Train with ``preset`` (:class:`nnpre.presets.Preset`): its pretext defaults and its training length, or,
        when the task (the composed one, else the alias's default) has ``training_length(preset) -> (epochs,
        iterations, val_iterations, save_every)``, that length (detection: nnDetection's recipe, 60 x 2500)."""
        self.preset = preset
        length = preset.training_length
        if self.pretext_name is None:
            hook = getattr(self.task or self.default_task(), "training_length", None)
            if hook is not None:
                length = hook(preset)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch, self.save_every = \
            (int(v) for v in length)

    def default_task(self) -> TrainingTask:
        """The alias's task: the pretext task ``pretext_name`` or the fine-tuning task ``task_name``."""
        if self.pretext_name is not None:
            from nnpre_trainers.tasks.pretext import PretextTrainingTask

            return PretextTrainingTask(self.pretext_name, **self.pretext_config(self.pretext_name))
        return get_task(self.task_name)

    def pretext_config(self, name: str, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Config overrides of pretext task ``name``: the preset's ``pretext_overrides[name]``
        (:class:`nnpre.presets.Preset`; e.g. cpu-tiny VoCo crops the plans patch), then ``config`` (the user's
        explicit values, which win)."""
        return {**dict(self.preset.pretext_overrides.get(name, {})), **dict(config or {})}

    def compose(self, task: Optional[TrainingTask] = None, transfer: Optional[EncoderTransfer] = None,
                schedule: Optional[FinetuneSchedule] = None, adapter=None, num_train_cases: Optional[int] = None,
                fraction: Optional[float] = None, tag: Optional[str] = None, seed: Optional[int] = None) -> None:
        """Inject the run's parts; call before training (``None`` keeps what is set: by default the alias's task,
        no transfer, no adapter, the task's default schedule, all training cases).

        Args:
            task: what is learnt (default :meth:`default_task`).
            transfer: encoder transfer for a new run (None = from scratch).
            schedule: stages and LR (default: the task's recipe, see the module doc).
            adapter: object with ``apply(network) -> None`` (e.g. LoRA), applied after the transfer.
            num_train_cases / fraction: a deterministic few-label subset of the fold's training cases.
            tag: plans variant of the run (:meth:`set_run_tag`): ``<Trainer>__<Plans>_<tag>__<config>/fold_X``.
            seed: run seed (network initialisation, loader RNGs).
        """
        if self.was_initialized:
            fail("the trainer's parts must be chosen before training starts")
        if num_train_cases is not None and num_train_cases < 1:
            fail(f"--num-train-cases must be >= 1, got {num_train_cases}")
        if fraction is not None and not 0 < fraction <= 1:
            fail(f"--fraction must be in (0, 1], got {fraction}")
        if task is not None:
            self.task = task
        if transfer is not None:
            self.transfer = transfer
        if schedule is not None:
            self.schedule = schedule
        if adapter is not None:
            self.adapter = adapter
        if num_train_cases is not None or fraction is not None:
            self.num_train_cases, self.fraction = num_train_cases, fraction
        if seed is not None:
            self.seed = int(seed)
        if tag:
            self.set_run_tag(tag)

    def configure_finetuning(self, pretrained: Optional[str] = None, from_scratch: bool = False,
                             num_train_cases: Optional[int] = None, fraction: Optional[float] = None,
                             schedule: Optional[FinetuneSchedule] = None, tag: Optional[str] = None,
                             task: Optional[TrainingTask] = None, adapter=None) -> None:
        """:meth:`compose` for fine-tuning from ``pretrained`` (or ``from_scratch``) with the default plans variant
        :func:`run_variant`: ``scratch`` / ``pt_<source>`` [+ ``_n<N>`` / ``_f<fraction>``] [+ ``_<adapter>``]."""
        if pretrained and from_scratch:
            fail("--pretrained and --from-scratch exclude each other")
        if not pretrained and not from_scratch:
            fail("give a pretrained checkpoint (--pretrained CKPT) or --from-scratch")
        transfer = EncoderTransfer(pretrained, self.dataset_json.get("channel_names")) if pretrained else None
        if tag is None:  # adapter runs get their own folder too: ..._lora
            tag = run_variant(None if from_scratch else pretrained, num_train_cases, fraction, adapter)
        self.compose(task=task, transfer=transfer, schedule=schedule, adapter=adapter,
                     num_train_cases=num_train_cases, fraction=fraction, tag=tag)

    def set_pretext(self, name: str, **config) -> None:
        """Pretrain with the registered pretext task ``name`` and config overrides (before training; they win over
        the preset's, see :meth:`pretext_config`)."""
        from nnpre_trainers.tasks.pretext import PretextTrainingTask

        if self.was_initialized:
            fail("the pretext task must be chosen before training starts")
        self.task = PretextTrainingTask(name, **self.pretext_config(name, config))

    @property
    def pretext(self):
        """The pretext task object of a pretraining run (None otherwise)."""
        return getattr(self.task or self.default_task(), "pretext", None)

    @property
    def from_scratch(self) -> bool:
        return self.transfer is None and self.transfer_record is None

    @property
    def stage_index(self) -> Optional[int]:
        return None if self.stages is None else self.stages.stage_index

    def set_run_tag(self, tag: str) -> None:
        """Train with the plans variant ``tag`` (:func:`variant_plans`): the run folder becomes nnU-Net's own
        ``<Trainer>__<plans>_<tag>__<config>/fold_X``, so pretrained / scratch / few-label / adapter runs don't
        collide and stock ``nnUNetv2_predict -p <plans>_<tag>`` and ``nnUNetv2_find_best_configuration`` find them.

        Rank 0 writes ``<plans>_<tag>.json`` next to the base plans. A trainer built with these plans
        (:func:`nnpre_trainers.run.make_trainer` ``variant=``, as ``nnPre_train`` does) changes nothing here;
        otherwise the empty folder the nnU-Net constructor made is removed by rank 0 after a DDP barrier (no
        rank touches a folder another rank is still creating) and nnU-Net's banner log moves along.
        """
        plans = variant_plans(self.plans_manager.plans, tag)
        if plans == self.plans_manager.plans:
            return
        if self.local_rank == 0 and self.preprocessed_dataset_folder_base is not None:
            write_variant_plans(plans, self.preprocessed_dataset_folder_base)
        old_folder, old_log = self.output_folder, self.log_file
        self._use_plans(plans)
        if self.is_ddp and dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.output_folder is None:
            return
        os.makedirs(self.output_folder, exist_ok=True)
        self.log_file = join(self.output_folder, os.path.basename(old_log))
        if self.local_rank != 0:
            return
        try:
            if os.path.isfile(old_log) and not os.path.exists(self.log_file):
                os.replace(old_log, self.log_file)
        except OSError:
            pass
        for empty in (old_folder, os.path.dirname(old_folder)):
            try:
                os.rmdir(empty)  # only when empty: a stock run trained with the base plans stays untouched
            except OSError:
                break

    def _use_plans(self, plans: dict) -> None:
        """Switch to ``plans`` (same configurations) and re-derive nnU-Net's folder names from them, as its
        constructor does; checkpoints' ``init_args`` then carry these plans."""
        from nnunetv2.paths import nnUNet_results
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans_manager = PlansManager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
        self.my_init_kwargs["plans"] = plans
        cls, ds, cfg = self.__class__.__name__, self.plans_manager.dataset_name, self.configuration_name
        if self.output_folder_base is not None:
            self.output_folder_base = join(nnUNet_results, ds, f"{cls}__{plans['plans_name']}__{cfg}")
            self.output_folder = join(self.output_folder_base, f"fold_{self.fold}")
        if self.is_cascaded:
            self.folder_with_segs_from_previous_stage = join(
                nnUNet_results, ds, f"{cls}__{plans['plans_name']}__{self.configuration_manager.previous_stage_name}",
                "predicted_next_stage", cfg)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    @property
    def global_iteration(self) -> int:
        """Index of the current training iteration over the whole run (0-based)."""
        return self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    @property
    def unwrapped_network(self) -> nn.Module:
        return unwrap(self.network)

    def task_context(self) -> TaskContext:
        return TaskContext(self.plans_manager, self.configuration_manager, self.label_manager, self.dataset_json,
                           self.num_input_channels, self._training_cases, self.print_to_log_file)

    def _training_cases(self) -> Iterator[Tuple[str, Any]]:
        tr, _ = self.do_split()
        ds = self.dataset_class(self.preprocessed_dataset_folder, tr)
        for k in tr:
            yield k, np.asarray(ds.load_case(k)[1])

    def _default_schedule(self) -> FinetuneSchedule:
        make = getattr(self.task, "default_schedule", None)  # a task's own recipe (detection: nnDetection's)
        if make is not None:
            return make(self)
        if self.task.recipe == "pretrain":
            return pretrain_schedule(self.total_iterations, self.num_iterations_per_epoch, base_lr=self.initial_lr)
        preset = preset_from_plans(self.plans_manager.plans)
        pretrained = not self.from_scratch
        kw = {} if preset.finetune_lr is None else {"base_lr": preset.finetune_lr[1 if pretrained else 0]}
        return default_schedule(self.total_iterations, pretrained=pretrained, optimizer=preset.finetune_optimizer,
                                **kw)

    # -- initialisation --------------------------------------------------------------------------------------
    def initialize(self):
        """Build the network (task) → transfer (new runs only) → adapter → stage optimizer → DDP."""
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        if self.num_epochs < 1 or self.num_iterations_per_epoch < 1:
            fail(f"training needs >= 1 epoch of >= 1 iteration, got {self.num_epochs} x "
                 f"{self.num_iterations_per_epoch}; pass --epochs N --iterations M with N, M >= 1")
        if self.task is None:
            self.task = self.default_task()
        amp_dtype(self.amp, self.device)  # an impossible mode (fp16 on CPU) stops here with one line
        self.grad_scaler = make_grad_scaler(self.device, self.amp)
        oversample = getattr(self.task, "foreground_oversampling", None)  # before nnU-Net splits it over DDP ranks
        if oversample is not None:
            self.oversample_foreground_percent = float(oversample(self))
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        with torch.random.fork_rng(devices=[]):  # the run's own seed; the caller's global RNG is left as it was
            torch.manual_seed(self.seed)
            net = self.task.build_network(self.task_context())
        if self.transfer is not None and not self._restoring:
            folder = self.output_folder if self.local_rank == 0 else None
            self.transfer_record = to_plain(self.transfer.apply(net, folder, self.print_to_log_file))
        if self.adapter is not None:
            self.adapter.apply(net)
            if hasattr(self.adapter, "describe") and self.local_rank == 0:  # trainable counts: log + adapter.json
                self.print_to_log_file(self.adapter.summary(net))
                write_json(self.adapter.describe(net), join(self.output_folder, "adapter.json"))
        self.network = net.to(self.device)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        if self.schedule is None:
            self.schedule = self._default_schedule()
        remapped = bool((self.transfer_record or {}).get("stem_remapped"))
        self.stages = StageController(self.schedule, lambda: parameter_groups(self.unwrapped_network, remapped),
                                      keep_requires_grad=self.is_ddp, log=self.print_to_log_file,
                                      may_train=getattr(self.adapter, "is_trainable", None),
                                      network=lambda: self.unwrapped_network)
        self.optimizer = self.stages.start(self.global_iteration, self._resume_stage if self._restoring else None)
        self.lr_scheduler = None
        if self.is_ddp:
            # Deep supervision is off: the lower-resolution seg layers get no gradient; let DDP know.
            if self.device.type == "cuda":
                self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
                self.network = DDP(self.network, device_ids=[self.local_rank], find_unused_parameters=True)
            else:
                self.network = DDP(self.network, find_unused_parameters=True)  # gloo on CPU: no device_ids
        self.task.setup(self)
        self.was_initialized = True

    def _do_i_compile(self) -> bool:
        """``compile_network`` when set, else nnU-Net's rule (CUDA: ``nnUNet_compile``, default on; CPU: off)."""
        if self.compile_network is not None:
            return bool(self.compile_network)
        return super()._do_i_compile()

    def set_deep_supervision_enabled(self, enabled: bool):
        """nnU-Net's toggle where the network has one (our tasks train without deep supervision)."""
        dec = getattr(self.unwrapped_network, "decoder", None)
        if dec is not None and hasattr(dec, "deep_supervision"):
            dec.deep_supervision = bool(enabled)

    # -- data ------------------------------------------------------------------------------------------------
    def do_split(self):
        """nnU-Net's split, then the few-label subset (``num_train_cases`` / ``fraction``), deterministic per fold."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        if self.fold != "all":
            self._check_fold_and_splits()
        tr, val = super().do_split()
        n = None
        if self.num_train_cases is not None:
            n = self.num_train_cases
        elif self.fraction is not None:
            n = max(1, int(round(self.fraction * len(tr))))
        if n is not None:
            if n > len(tr):
                fail(f"--num-train-cases {n} exceeds the {len(tr)} training cases of fold {self.fold}")
            order = np.random.default_rng(SUBSET_SEED).permutation(sorted(tr))
            tr = sorted(order[:n].tolist())
            if self.local_rank == 0:
                write_json({"train": tr, "val": list(val)}, join(self.output_folder, "train_cases.json"))
        return tr, val

    def _check_fold_and_splits(self) -> None:
        """One-line errors instead of nnU-Net's silent fallbacks: a fold the split does not have (nnU-Net would
        train on a random 80:20 split), too few cases for a 5-fold split (sklearn error), a ``splits_final.json``
        that does not match the preprocessed cases (a case silently never trained on, or a missing case)."""
        from batchgenerators.utilities.file_and_folder_operations import isfile

        from nnpre.dataset_checks import read_splits

        ids = set(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
        dataset = os.path.basename(self.preprocessed_dataset_folder_base)
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        fold = int(self.fold)
        if not isfile(splits_file):
            if not 0 <= fold < 5:
                fail(f"fold {fold} does not exist: nnU-Net's split has folds 0-4; use -f 0..4 or -f all (or write "
                     f"{splits_file} with more folds)")
            if len(ids) < 5:
                fail(f"fold {fold} needs nnU-Net's 5-fold split, but {dataset} has only {len(ids)} preprocessed "
                     f"cases; train with -f all, or write {splits_file} with your own split")
            return
        try:
            splits, named = read_splits(splits_file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{splits_file} is not a list of {{'train': [...], 'val': [...]}} folds ({e}); fix or delete it "
                 f"(nnU-Net then writes a new 5-fold split)")
        if not 0 <= fold < len(splits):
            fail(f"{splits_file} defines folds 0-{len(splits) - 1}, not fold {fold}; pick one of them, or add the "
                 f"fold to the file")
        unknown, unlisted = sorted(named - ids), sorted(ids - named)
        if unknown:
            fail(f"{splits_file} names {len(unknown)} case(s) that are not in the preprocessed dataset "
                 f"({', '.join(unknown[:5])}); delete the file to let nnU-Net write a new split, or fix it")
        if unlisted:
            fail(f"{splits_file} does not list {len(unlisted)} preprocessed case(s) ({', '.join(unlisted[:5])}), "
                 f"which would never be trained or validated on; delete the file to let nnU-Net write a new split, "
                 f"or add them")

    def get_dataloaders(self):
        if self.task.needs_labels and not self.label_manager.foreground_labels:
            fail(f"{os.path.basename(self.preprocessed_dataset_folder_base)} has no labels (an image-only pool); "
                 f"{self.task.name} needs a dataset with labelsTr and foreground labels in dataset.json "
                 f"(pretrain on the pool with nnPre_train pretrain instead)")
        tr, val = self.do_split()
        return self.task.get_dataloaders(self, tr, val)

    def nnunet_loaders(self, train_keys: List[str], val_keys: List[str], extra_transforms: Sequence = ()):
        """nnU-Net's loaders and augmentation for ``train_keys`` / ``val_keys`` (no deep supervision), seeded and
        in deterministic worker order (:func:`nnpre_trainers.loaders.start_augmenters`); ``extra_transforms``
        (batchgeneratorsv2) run last in both pipelines, in the workers."""
        ps = self.configuration_manager.patch_size
        rot, dummy_2d, initial_ps, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        tr_tf = self.get_training_transforms(ps, rot, None, mirror_axes, dummy_2d,
                                             use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
                                             is_cascaded=self.is_cascaded, foreground_labels=lm.foreground_labels,
                                             regions=lm.foreground_regions if lm.has_regions else None,
                                             ignore_label=lm.ignore_label)
        val_tf = self.get_validation_transforms(None, is_cascaded=self.is_cascaded,
                                                foreground_labels=lm.foreground_labels,
                                                regions=lm.foreground_regions if lm.has_regions else None,
                                                ignore_label=lm.ignore_label)
        for tf in (tr_tf, val_tf):
            tf.transforms.extend(extra_transforms)
        folder = self.preprocessed_dataset_folder
        prev = self.folder_with_segs_from_previous_stage
        ds_tr = self.dataset_class(folder, train_keys, folder_with_segs_from_previous_stage=prev)
        ds_val = self.dataset_class(folder, val_keys, folder_with_segs_from_previous_stage=prev)
        kw = dict(oversample_foreground_percent=self.oversample_foreground_percent, sampling_probabilities=None,
                  pad_sides=None, probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = nnUNetDataLoader(ds_tr, self.batch_size, initial_ps, ps, lm, transforms=tr_tf, **kw)
        dl_val = nnUNetDataLoader(ds_val, self.batch_size, ps, ps, lm, transforms=val_tf, **kw)
        seed = self.seed + 1000 * self.local_rank
        return start_augmenters(dl_tr, dl_val, seed, get_allowed_n_proc_DA(), self.device.type == "cuda")

    # -- run folder ----------------------------------------------------------------------------------------
    def on_train_start(self):
        """Lock the run folder, refuse to replace a finished run (unless ``overwrite``), remove the leftovers of
        interrupted checkpoint writes, then nnU-Net's start (initialise, loaders, plans copies)."""
        if self.local_rank == 0:
            self._lock = RunLock(self.output_folder).acquire()
            done = None if self._resumed or self.overwrite else finished_checkpoint(self.output_folder)
            if done:
                fail(f"{done} exists: this run has finished; pass --overwrite to train it again from scratch, "
                     f"use another run folder, or continue it with --c and more --epochs")
            for p in remove_stale_temp_files(self.output_folder):
                self.print_to_log_file(f"removed {p} (an interrupted checkpoint write)")
        super().on_train_start()

    def on_train_end(self):
        """A schedule with a weight-averaging stage (SWA) makes the average the final weights first, so
        ``checkpoint_final.pth`` (written by nnU-Net's ``on_train_end``) holds the average."""
        if self.stages is not None:
            self.stages.finish()
        super().on_train_end()
        self.release_run_folder()

    def release_run_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- steps -----------------------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        self.network.train()
        self.iteration_in_epoch = 0
        lr = self.schedule.lr_at(self.global_iteration)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {np.round(lr, decimals=6)}")
        self.logger.log("lrs", lr, self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        self.optimizer = self.stages.enter(self.global_iteration)
        inputs = self.task.prepare_batch(batch, self.device)
        self.network.train()
        return train_step(self.network, self.optimizer, lambda: self.task.compute_losses(self.network, inputs),
                          self.device, self.grad_scaler, self.schedule.grad_clip,
                          where=f"{self.task.name}, epoch {self.current_epoch}, cases {batch.get('keys')}",
                          amp=self.amp)

    def validation_step(self, batch: dict) -> dict:
        return self.task.validation_step(self, batch)

    def on_validation_epoch_end(self, val_outputs):
        self.task.on_validation_epoch_end(self, val_outputs)

    def on_epoch_end(self):
        self.task.on_epoch_end(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.task.final_validation(self, save_probabilities)

    # -- loss-only epochs (pretraining, detection: no pseudo-Dice) -------------------------------------------
    def log_mean_val_loss(self, val_outputs) -> None:
        """Log the mean of ``val_outputs[i]["loss"]`` (NaN if empty; averaged over DDP ranks) as ``val_losses``."""
        losses = [float(o["loss"]) for o in val_outputs]
        loss = float(np.mean(losses)) if losses else float("nan")
        if self.is_ddp:
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t)
            loss = float(t.item()) / dist.get_world_size()
        self.logger.log("val_losses", loss, self.current_epoch)

    def end_loss_epoch(self, monitor: Optional[Tuple[str, float, str]] = None) -> None:
        """Log the epoch's losses and time; ``checkpoint_best`` by ``monitor`` = ``(key, value, mode)``
        (:meth:`select_best`; default the validation loss, ``("val_loss", <mean val loss>, "min")``); then
        ``checkpoint_latest`` every ``save_every`` epochs (after the best, so it holds the updated best value).
        Does not advance ``current_epoch``."""
        from time import time

        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        log = self.logger.local_logger.my_fantastic_logging
        tr, va = float(log["train_losses"][-1]), float(log["val_losses"][-1])
        self.print_to_log_file(f"train_loss {tr:.4f}  val_loss {va:.4f}  epoch time "
                               f"{log['epoch_end_timestamps'][-1] - log['epoch_start_timestamps'][-1]:.1f} s")
        key, value, mode = monitor if monitor is not None else ("val_loss", va, "min")
        self.select_best(value, key, mode)
        e = self.current_epoch
        if (e + 1) % self.save_every == 0 and e != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))

    def select_best(self, value: float, key: str = "val_loss", mode: str = "min") -> bool:
        """Save ``checkpoint_best.pth`` if ``value`` of validation metric ``key`` beats the best epoch so far
        (``mode`` ``"min"`` or ``"max"``; NaN never does; a different ``key`` than the stored best's starts anew).

        The best (``best_metric``: key, mode, value, epoch) is written into every checkpoint (``nnpre_best``)
        and restored by :meth:`load_checkpoint`, so a resumed run never replaces ``checkpoint_best`` with a worse
        epoch. For ``val_loss`` nnU-Net's ``_best_ema`` is kept equal to it (stock checkpoint field).
        Returns whether this epoch is the new best.
        """
        best = self.best_metric.get("value") if self.best_metric.get("key") == key else None
        if not improves(value, best, mode):
            return False
        self.best_metric = {"key": key, "mode": mode, "value": float(value), "epoch": int(self.current_epoch)}
        if key == "val_loss":
            self._best_ema = float(value)
        self.print_to_log_file(f"new best {key}: {float(value):.4f}")
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        return True

    # -- checkpoints -----------------------------------------------------------------------------------------
    def run_record(self) -> Dict[str, Any]:
        """What a resumed run needs besides the weights (stored as ``nnpre_run`` in every checkpoint)."""
        return to_plain({
            "task": self.task.name,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "stage_index": self.stage_index,
            "transfer": self.transfer_record,
            "pretrained": (self.transfer_record or {}).get("checkpoint"),
            "from_scratch": self.from_scratch,
            "num_train_cases": self.num_train_cases,
            "fraction": self.fraction,
            "seed": self.seed,
            "adapter": None if self.adapter is None else {
                "name": getattr(self.adapter, "name", type(self.adapter).__name__),
                "options": self.adapter.options() if hasattr(self.adapter, "options") else {}},
        })

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": to_plain(self.logger.get_checkpoint()),
            "_best_ema": to_plain(self._best_ema),
            "nnpre_best": to_plain(self.best_metric),
            "nnpre_stages": self.stages.state_dict() if self.stages is not None else None,
            "current_epoch": self.current_epoch + 1,
            "init_args": to_plain(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": to_plain(self.inference_allowed_mirroring_axes),
            "nnpre_run": self.run_record(),
        }
        checkpoint.update(self.task.checkpoint_extras(self))
        save_checkpoint_atomic(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """Restore a checkpoint (path → :func:`safe_load`, or an already loaded dict) to continue its run.

        The run record (schedule, transfer report) is restored *before* the network is built, so the transfer is
        not repeated and the optimizer of the checkpoint's stage is built once. Same effect as nnU-Net's
        ``load_checkpoint`` (whose dict branch is broken in 2.8.1), without unsafe unpickling; ``module.`` /
        ``_orig_mod.`` key prefixes are stripped.
        """
        ck = safe_load(filename_or_checkpoint) if isinstance(filename_or_checkpoint, (str, os.PathLike)) \
            else filename_or_checkpoint
        record = ck.get("nnpre_run") or ck.get("nnpre_finetune") or {}
        if record.get("schedule"):
            self.schedule = FinetuneSchedule.from_dict(record["schedule"])
        if record.get("transfer") is not None:
            self.transfer_record = record["transfer"]
        elif record.get("stem_remapped") is not None and not record.get("from_scratch", True):
            self.transfer_record = {"stem_remapped": bool(record["stem_remapped"]),
                                    "checkpoint": record.get("pretrained")}
        if not self.was_initialized:
            self._restore_adapter(record.get("adapter"), filename_or_checkpoint)
        self.current_epoch = int(ck["current_epoch"])
        self.iteration_in_epoch = 0
        self._resumed = True
        self._resume_stage = record.get("stage_index")
        if not self.was_initialized:
            self._restoring = True
            try:
                self.initialize()
            finally:
                self._restoring = False
        else:
            self.optimizer = self.stages.start(self.global_iteration, self._resume_stage)
        self.my_init_kwargs = ck.get("init_args", self.my_init_kwargs)
        self.logger.load_checkpoint(ck["logging"])
        self._best_ema = ck.get("_best_ema")
        # checkpoint_best's metric; checkpoints without it knew only nnU-Net's lowest validation loss
        self.best_metric = dict(ck.get("nnpre_best") or (
            {"key": "val_loss", "mode": "min", "value": float(self._best_ema)} if self._best_ema is not None else {}))
        self.inference_allowed_mirroring_axes = ck.get("inference_allowed_mirroring_axes",
                                                       self.inference_allowed_mirroring_axes)
        self.unwrapped_network.load_state_dict(strip_prefixes(ck["network_weights"]))
        self.optimizer.load_state_dict(ck["optimizer_state"])
        self.stages.load_state_dict(ck.get("nnpre_stages"))  # e.g. the SWA average of a run resumed mid-SWA
        self.stages.set_lr(self.global_iteration)
        if self.grad_scaler is not None and ck.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ck["grad_scaler_state"])

    def _restore_adapter(self, record: Optional[Dict[str, Any]], source: Any) -> None:
        """``--c``: rebuild the checkpoint's adapter (when none was given) before the network is built, so the
        adapted weights load; a different adapter than the checkpoint's stops with one line."""
        from nnpre_trainers.adapters import adapter_from_dict

        saved = adapter_from_dict(record).to_dict()
        if self.adapter is None:
            if saved["name"] != "full":
                self.adapter = adapter_from_dict(record)
        elif hasattr(self.adapter, "to_dict") and self.adapter.to_dict() != saved:
            where = source if isinstance(source, (str, os.PathLike)) else "the checkpoint"
            fail(f"{where} was trained with adapter {saved['name']} {saved['options']}, not "
                 f"{self.adapter.name} {self.adapter.options()}; resume with the checkpoint's --adapter options")

    # -- loop ------------------------------------------------------------------------------------------------
    def run_training(self):
        try:
            self._run_training()
        finally:
            self.release_run_folder()

    def _run_training(self):
        self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            bar = tqdm(range(self.num_iterations_per_epoch), desc=f"epoch {epoch + 1}/{self.num_epochs}",
                       disable=self.local_rank != 0 or not self.show_progress, leave=False)
            for it in bar:
                self.iteration_in_epoch = it
                outputs.append(self.train_step(next(self.dataloader_train)))
                bar.set_postfix(loss=f"{float(outputs[-1]['loss']):.4f}")
            self.iteration_in_epoch = 0
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()
        if self.is_ddp:  # every rank returns once rank 0 has written checkpoint_final (a next run may read it)
            dist.barrier()


def ddp_setup_from_env() -> bool:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, nccl on GPU).

    Returns True when running distributed. Must be called before constructing a trainer.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True

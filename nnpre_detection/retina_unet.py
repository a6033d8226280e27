"""Retina U-Net (Jaeger et al. 2018) composed of injected parts, with nnDetection v001 defaults.

The detector holds an nnU-Net encoder (dynamic-network-architectures ``ResidualEncoder`` or
``PlainConvEncoder``, registered as attribute ``encoder`` so its state-dict keys are exactly
``encoder.stem.*`` / ``encoder.stages.*`` of nnU-Net's ``ResidualEncoderUNet`` / ``PlainConvUNet``), a
:class:`~nnpre_detection.decoder.UFPNDecoder`, shared classification / regression heads on the detection
levels, an auxiliary fg/bg segmentation head on decoder level 0, and the non-learned parts: anchor generator,
ATSS matcher, hard-negative sampler and box coder.

Call contract (torchvision / MONAI RetinaNet style):

* training mode: ``model(images, targets)`` -> dict of weighted loss components ``cls``, ``reg``, ``seg_ce``,
  ``seg_dice`` and their sum ``loss`` (back-propagate ``loss``; do not sum the dict);
* eval mode: ``model(images)`` -> list (one per image) of ``{"boxes": (K, 6), "scores": (K,),
  "labels": (K,)}`` (labels are class indices starting at 0);
* ``images``: (B, C, X, Y, Z); ``targets``: list of B dicts ``{"boxes": (N, 6) float in nnDetection layout
  (x1, y1, x2, y2, z1, z2) in patch voxel coordinates, "labels": (N,) long class indices from 0,
  "seg": (X, Y, Z) foreground mask (> 0 = foreground)}``.
"""
from __future__ import annotations

import dataclasses
import inspect
import pydoc
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from nnpre.architecture import KEY_LAYOUTS, KWARGS_REQUIRING_IMPORT, encoder_family, key_layout
from nnpre.errors import fail
from nnpre_detection.anchors import AnchorGenerator, AnchorPlan, default_anchor_plan, relative_level_factors
from nnpre_detection.atss import ATSSMatcher
from nnpre_detection.boxes import box_size, clip_boxes
from nnpre_detection.coder import DEFAULT_CLIP, BoxCoder
from nnpre_detection.decoder import UFPNDecoder, ufpn_channels
from nnpre_detection.heads import ClassificationHead, RegressionHead, SegmentationHead
from nnpre_detection.losses import classification_loss, giou_loss, segmentation_losses, sigmoid_focal_loss
from nnpre_detection.nms import batched_nms
from nnpre_detection.sampler import HardNegativeSampler

#: nnU-Net's ``_kw_requires_import`` for the U-Net classes (strings resolved with ``pydoc.locate``).
DEFAULT_REQ_IMPORT = tuple(KWARGS_REQUIRING_IMPORT)

#: Architecture class names (last dotted component) -> encoder class.
ENCODERS = {
    "ResidualEncoderUNet": ResidualEncoder,
    "ResidualEncoder": ResidualEncoder,
    "PlainConvUNet": PlainConvEncoder,
    "PlainConvEncoder": PlainConvEncoder,
}
#: arch_kwargs that only concern nnU-Net's decoder and are ignored here.
DECODER_ONLY_KWARGS = {"n_conv_per_stage_decoder", "deep_supervision", "num_classes", "input_channels"}

#: nnDetection's detection-level rule (c002.py): 4 levels, first level at most 2.
NUM_DECODER_LEVELS = 4
MIN_DECODER_LEVEL = 2


def default_decoder_levels(n_stages: int) -> Tuple[int, ...]:
    """Detection levels for ``n_stages`` resolution stages: ``min(max(1, R - 4), 2) .. R - 1`` (nnDetection)."""
    start = min(max(1, n_stages - NUM_DECODER_LEVELS), MIN_DECODER_LEVEL)
    return tuple(range(start, n_stages))


@dataclass(frozen=True)
class RetinaUNetConfig:
    """Hyper-parameters of the detector (defaults: nnDetection v001 ``v001.yaml`` / ``base.py``).

    Attributes:
        decoder_levels: detection levels (encoder stage indices); ``None`` = nnDetection rule.
        fpn_channels: decoder channels on the detection levels; ``None`` = 4 x width of stage 0 (128 for 32).
        min_decoder_channels: floor of the halved channels above the detection levels (8).
        head_channels / head_convs / head_group_channels: head tower (128 / 2 / 16 channels per group).
        prior_prob: initial foreground probability of the classifier (0.01).
        learn_scale: learnable per-level regression scale (True).
        num_candidates / center_in_gt: ATSS (4 / False).
        batch_size_per_image / positive_fraction / pool_size / min_neg: hard-negative sampler (32/0.33/20/1).
        seg_ce_weight / seg_dice_weight: segmentation loss weights (0.5 / 0.5).
        cls_loss: ``"bce"`` (nnDetection: BCE on the hard-negative sampler's anchors, GIoU on its positives) or
            ``"focal"`` (RetinaNet's dense sigmoid focal loss over all anchors, GIoU on all matched anchors; the
            small-budget option, see :mod:`nnpre_detection.recipe`).
        focal_alpha / focal_gamma: focal loss parameters (RetinaNet: 0.25 / 2).
        coder_weights / coder_clip: box coder (all 1 / log(1000/16)).
        topk_candidates / score_thresh / min_box_size / nms_iou / detections_per_image: patch post-processing
            (10000 / 0.0 / 0.01 / 0.6 / 100).
        seed: seed of the detector's own sampling generator (used when ``forward`` gets none).
    """

    decoder_levels: Optional[Tuple[int, ...]] = None
    fpn_channels: Optional[int] = None
    min_decoder_channels: int = 8
    head_channels: int = 128
    head_convs: int = 2
    head_group_channels: int = 16
    prior_prob: float = 0.01
    learn_scale: bool = True
    num_candidates: int = 4
    center_in_gt: bool = False
    batch_size_per_image: int = 32
    positive_fraction: float = 0.33
    pool_size: float = 20
    min_neg: int = 1
    seg_ce_weight: float = 0.5
    seg_dice_weight: float = 0.5
    cls_loss: str = "bce"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    coder_weights: Tuple[float, ...] = (1.0,) * 6
    coder_clip: float = DEFAULT_CLIP
    topk_candidates: int = 10000
    score_thresh: float = 0.0
    min_box_size: float = 0.01
    nms_iou: float = 0.6
    detections_per_image: int = 100
    seed: int = 0

    def with_overrides(self, **overrides) -> "RetinaUNetConfig":
        """Copy with the given fields replaced; unknown names raise a one-line error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            fail(f"unknown Retina U-Net option(s) {unknown}; valid: {sorted(known)}")
        if overrides.get("cls_loss", "bce") not in ("bce", "focal"):
            fail(f"Retina U-Net option cls_loss must be 'bce' or 'focal', got {overrides['cls_loss']!r}")
        return dataclasses.replace(self, **overrides)


class RetinaUNet(AbstractDynamicNetworkArchitectures):
    """Retina U-Net detector composed of injected parts.

    Args:
        encoder: nnU-Net encoder built with ``return_skips=True`` (``ResidualEncoder`` or ``PlainConvEncoder``).
        decoder: UFPN decoder whose ``output_levels`` contain 0 and every detection level.
        classifier / regressor: shared heads over the detection levels.
        segmenter: fg/bg head on decoder level 0.
        anchor_generator: anchors on the detection levels. matcher: ATSS. sampler: hard-negative sampler.
        coder: box coder.
        decoder_levels: detection levels (encoder stage indices), ascending.
        num_classes: foreground classes.
        config: post-processing, loss weights and seed (see :class:`RetinaUNetConfig`).

    Transfer-learning attributes (as dynamic-network-architectures): ``key_to_encoder``, ``key_to_stem``,
    ``keys_to_in_proj`` point to the same modules as in the matching nnU-Net U-Net, and ``encoder_family``
    names that U-Net class (``"ResidualEncoderUNet"`` / ``"PlainConvUNet"``) for topology checks; every
    parameter outside ``encoder.`` belongs to the decoder or the heads (what a decoder-only warm-up trains).
    """

    #: Parameter-name prefixes of the task heads (trained with the decoder during a decoder-only warm-up).
    head_prefixes = ("classifier.", "regressor.", "segmenter.")
    # ResidualEncoder layout by default; __init__ sets the layout of the injected encoder's U-Net family.
    key_to_encoder = KEY_LAYOUTS["ResidualEncoderUNet"]["key_to_encoder"]
    key_to_stem = KEY_LAYOUTS["ResidualEncoderUNet"]["key_to_stem"]
    keys_to_in_proj = tuple(KEY_LAYOUTS["ResidualEncoderUNet"]["keys_to_in_proj"])

    def __init__(self, encoder: nn.Module, decoder: UFPNDecoder, classifier: ClassificationHead,
                 regressor: RegressionHead, segmenter: SegmentationHead, anchor_generator: AnchorGenerator,
                 matcher: ATSSMatcher, sampler: HardNegativeSampler, coder: BoxCoder,
                 decoder_levels: Sequence[int], num_classes: int, config: RetinaUNetConfig = RetinaUNetConfig()):
        super().__init__()
        self.encoder_family = encoder_family(encoder)  # PlainConvEncoder: the stem is the first stage
        layout = key_layout(self.encoder_family)
        self.key_to_encoder, self.key_to_stem = layout["key_to_encoder"], layout["key_to_stem"]
        self.keys_to_in_proj = tuple(layout["keys_to_in_proj"])
        self.key_to_lpe = layout["key_to_lpe"]
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = classifier
        self.regressor = regressor
        self.segmenter = segmenter
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.sampler = sampler
        self.coder = coder
        self.decoder_levels = tuple(int(v) for v in decoder_levels)
        self.num_classes = int(num_classes)
        self.config = config
        if 0 not in decoder.output_levels or not set(self.decoder_levels) <= set(decoder.output_levels):
            fail(f"decoder output levels {decoder.output_levels} must contain 0 and {self.decoder_levels}")
        if anchor_generator.num_levels != len(self.decoder_levels):
            fail(f"anchor generator has {anchor_generator.num_levels} levels, detector {len(self.decoder_levels)}")
        self._generator = torch.Generator().manual_seed(int(config.seed))

    # ----------------------------------------------------------------------------------------- forward
    def head_outputs(self, images: torch.Tensor, sparse: bool = False) -> Dict[str, object]:
        """Run the network.

        Args:
            images: (B, C, X, Y, Z).
            sparse: outputs for the training loss only (what the training forward uses). The loss needs the
                regressor at the sampled positives and the classifier's gradient at the sampled anchors only, so
                ``box_deltas`` is ``None``, ``cls_logits`` is computed without gradient (it ranks the hard
                negatives) and ``cls_towers`` / ``reg_towers`` hold the towers' outputs, from which
                :meth:`compute_loss` evaluates the output convs at those anchors (:meth:`RegressionHead.deltas_at`,
                :meth:`ClassificationHead.outputs_at`): same values and gradients as the dense heads, without the
                dense regression conv (6 x anchors-per-position channels on every level) and the dense
                backward of the classification conv. With ``cls_loss="focal"`` (a loss over every anchor) the
                classifier stays dense. ``False``: dense outputs for every anchor (:meth:`postprocess`).

        Returns:
            dict with ``cls_logits`` (B, A, num_classes), ``box_deltas`` (B, A, 6) or ``None``, ``seg_logits``
            (B, 2, X0, Y0, Z0) on decoder level 0, ``anchors`` (A, 6) float32, ``num_anchors_per_level``, and
            with ``sparse`` the per-level tower outputs ``reg_towers`` (and ``cls_towers`` for the BCE loss).
        """
        if images.ndim != 5:
            raise ValueError(f"images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}")
        skips = self.encoder(images)
        levels = self.decoder(skips)
        by_level = dict(zip(self.decoder.output_levels, levels))
        det = [by_level[lvl] for lvl in self.decoder_levels]
        anchors_per_level = self.anchor_generator(images.shape[2:], [f.shape[2:] for f in det], images.device)
        out: Dict[str, object] = {}
        if not sparse:
            out.update(cls_logits=self.classifier(det), box_deltas=self.regressor(det))
        else:
            out.update(box_deltas=None, reg_towers=self.regressor.towers(det))
            if self.config.cls_loss == "focal":
                out["cls_logits"] = self.classifier(det)
            else:
                out["cls_towers"] = self.classifier.towers(det)
                with torch.no_grad():
                    out["cls_logits"] = self.classifier.from_towers(out["cls_towers"])
        out.update(seg_logits=self.segmenter(by_level[0]), anchors=torch.cat(anchors_per_level),
                   num_anchors_per_level=[a.shape[0] for a in anchors_per_level],
                   image_shape=tuple(images.shape[2:]))
        return out

    def forward(self, images: torch.Tensor, targets: Optional[List[dict]] = None,
                generator: Optional[torch.Generator] = None):
        """Loss dict in training mode (``targets`` required), detections in eval mode (see module docstring).

        Args:
            images: (B, C, X, Y, Z). targets: list of B target dicts. generator: CPU generator for the
                sampler (default: the detector's own, seeded with ``config.seed``).
        """
        if self.training:
            if targets is None:
                raise ValueError("RetinaUNet in training mode needs targets; call .eval() for predictions")
            # validate before running the network so that bad targets fail fast
            if len(targets) != images.shape[0]:
                raise ValueError(f"got {len(targets)} target dicts for a batch of {images.shape[0]} images")
            for i, t in enumerate(targets):
                self._check_target(t, i, images.device)
                self._seg_target(t, i, images.shape[2:], images.device)
            return self.compute_loss(self.head_outputs(images, sparse=True), targets, generator)
        return self.postprocess(self.head_outputs(images))

    @torch.no_grad()
    def predict_patch(self, images: torch.Tensor, return_seg: bool = False) -> List[dict]:
        """Detections for a batch of patches (call ``.eval()`` first if the encoder uses dropout).

        Args:
            images: (B, C, X, Y, Z).
            return_seg: also return ``"seg"``: the (X0, Y0, Z0) foreground probability of decoder level 0.

        Returns:
            list of B dicts with ``boxes`` (K, 6) float32, ``scores`` (K,), ``labels`` (K,) long.
        """
        out = self.head_outputs(images)
        dets = self.postprocess(out)
        if return_seg:
            fg = torch.softmax(out["seg_logits"].float(), dim=1)[:, 1]
            for d, s in zip(dets, fg):
                d["seg"] = s
        return dets

    # -------------------------------------------------------------------------------------------- loss
    # Kept out of torch.compile (nnU-Net compiles the network on CUDA by default): matching, sampling and the
    # box-count-dependent shapes would cut the graph ~20 times and recompile with every new number of boxes,
    # so only head_outputs (the dense network) is compiled; the loss runs eagerly on few anchors.
    @torch.compiler.disable
    def compute_loss(self, out: Dict[str, object], targets: List[dict],
                     generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Losses of one batch (ATSS matching, hard-negative sampling, BCE + GIoU + CE/Dice).

        Args:
            out: :meth:`head_outputs` result. targets: list of B target dicts.
            generator: CPU generator for the sampler.

        Returns:
            ``{"cls", "reg", "seg_ce", "seg_dice", "loss"}`` scalar tensors; ``loss`` is the sum of the others.
        """
        cls_logits, box_deltas = out["cls_logits"], out["box_deltas"]
        anchors, counts = out["anchors"], out["num_anchors_per_level"]
        batch = cls_logits.shape[0]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {batch} images")
        device = cls_logits.device
        labels, matched, all_boxes = [], [], []
        offset = 0
        for i, t in enumerate(targets):
            gt_boxes, gt_labels = self._check_target(t, i, device)
            idx = self.matcher(gt_boxes, anchors, counts, self.anchor_generator.num_anchors_per_location)
            lab = torch.zeros(anchors.shape[0], dtype=torch.long, device=device)
            fg = idx >= 0
            lab[fg] = gt_labels[idx[fg]] + 1
            labels.append(lab)
            matched.append(idx + offset)  # index into the batch's concatenated boxes (read at positives only)
            all_boxes.append(gt_boxes)
            offset += gt_boxes.shape[0]
        num_classes = cls_logits.shape[2]
        if self.config.cls_loss == "focal":
            pos = torch.stack(labels) > 0
            cls = sigmoid_focal_loss(cls_logits.reshape(-1, num_classes), torch.cat(labels), int(pos.sum()),
                                     self.config.focal_alpha, self.config.focal_gamma)
        else:
            fg_probs = torch.sigmoid(cls_logits.detach().float()).max(dim=2).values
            pos, neg = self.sampler(labels, list(fg_probs), generator or self._generator)
            pos = torch.stack(pos)
            # one gather over the batch (image-major, ascending anchor: the per-image order)
            sel_b, sel_a = torch.nonzero(pos | torch.stack(neg), as_tuple=True)
            if out.get("cls_towers") is not None:
                sel_logits = self.classifier.outputs_at(out["cls_towers"], sel_b, sel_a)[0]
            else:
                sel_logits = cls_logits[sel_b, sel_a]
            cls = classification_loss(sel_logits, torch.stack(labels)[sel_b, sel_a])

        b_idx, a_idx = torch.nonzero(pos, as_tuple=True)  # (P,) image / anchor of every sampled positive
        if box_deltas is None:
            deltas = self.regressor.deltas_at(out["reg_towers"], b_idx, a_idx)
        else:
            deltas = box_deltas[b_idx, a_idx]
        target_boxes = torch.cat(all_boxes)[torch.stack(matched)[b_idx, a_idx]]
        reg = giou_loss(self.coder.decode(deltas, anchors[a_idx]), target_boxes)

        seg_logits = out["seg_logits"]
        seg_target = torch.stack([self._seg_target(t, i, seg_logits.shape[2:], device) for i, t in enumerate(targets)])
        seg_ce, seg_dice = segmentation_losses(seg_logits, seg_target, self.config.seg_ce_weight,
                                               self.config.seg_dice_weight)
        losses = {"cls": cls, "reg": reg, "seg_ce": seg_ce, "seg_dice": seg_dice}
        losses["loss"] = cls + reg + seg_ce + seg_dice
        return losses

    @torch.compiler.disable
    def _check_target(self, t: dict, i: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] needs keys 'boxes' (N, 6) and 'labels' (N,)")
        boxes = torch.as_tensor(t["boxes"]).to(device=device, dtype=torch.float32).reshape(-1, 6)
        labels = torch.as_tensor(t["labels"]).to(device=device, dtype=torch.long).reshape(-1)
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{i}]: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"targets[{i}]: labels must be class indices in [0, {self.num_classes}), "
                             f"got {labels.unique().tolist()}")
        return boxes, labels

    @staticmethod
    @torch.compiler.disable
    def _seg_target(t: dict, i: int, shape, device) -> torch.Tensor:
        if t.get("seg") is None:
            raise ValueError(f"targets[{i}] has no 'seg' mask; Retina U-Net needs the fg/bg mask of the patch")
        seg = torch.as_tensor(t["seg"]).to(device)
        seg = seg.reshape(seg.shape[-3:]) if seg.ndim == 4 and seg.shape[0] == 1 else seg
        if tuple(seg.shape) != tuple(shape):
            raise ValueError(f"targets[{i}]['seg'] has shape {tuple(seg.shape)}, expected {tuple(shape)}")
        return (seg > 0).long()

    # ------------------------------------------------------------------------------------ postprocess
    def postprocess(self, out: Dict[str, object]) -> List[dict]:
        """Per patch: decode, clip, top-k candidates, score threshold, drop tiny boxes, class-wise NMS, top-N
        (nnDetection ``postprocess_detections_single_image``)."""
        cfg = self.config
        cls_logits, box_deltas, anchors = out["cls_logits"], out["box_deltas"], out["anchors"]
        num_classes = cls_logits.shape[2]
        results = []
        for i in range(cls_logits.shape[0]):
            probs = torch.sigmoid(cls_logits[i].float()).flatten()
            k = min(cfg.topk_candidates, probs.numel())
            scores, flat_idx = probs.topk(k)
            keep = scores > cfg.score_thresh
            scores, flat_idx = scores[keep], flat_idx[keep]
            anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
            labels = flat_idx % num_classes
            boxes = self.coder.decode(box_deltas[i][anchor_idx].float(), anchors[anchor_idx])
            boxes = clip_boxes(boxes, out["image_shape"])
            keep = (box_size(boxes) >= cfg.min_box_size).all(dim=1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, cfg.nms_iou, max_keep=cfg.detections_per_image)
            results.append({"boxes": boxes[keep].detach(), "scores": scores[keep].detach(), "labels": labels[keep]})
        return results


# ------------------------------------------------------------------------------------------------ builder
def _resolve_imports(arch_kwargs: dict, req_import: Sequence[str]) -> dict:
    kwargs = dict(arch_kwargs)
    for key in req_import:
        value = kwargs.get(key)
        if isinstance(value, str):
            located = pydoc.locate(value)
            if located is None:
                fail(f"arch_kwargs['{key}'] = '{value}' cannot be imported; fix the plans' architecture entry")
            kwargs[key] = located
    return kwargs


def build_encoder(arch_class_name: str, arch_kwargs: dict, num_input_channels: int,
                  arch_kwargs_req_import: Sequence[str] = DEFAULT_REQ_IMPORT) -> nn.Module:
    """The nnU-Net encoder of a plans architecture entry, with ``return_skips=True``.

    Args:
        arch_class_name: ``configuration_manager.network_arch_class_name`` (only the last dotted component
            matters: ``ResidualEncoderUNet`` or ``PlainConvUNet``).
        arch_kwargs: ``configuration_manager.network_arch_init_kwargs``.
        num_input_channels: image channels.
        arch_kwargs_req_import: ``configuration_manager.network_arch_init_kwargs_req_import``.
    """
    name = str(arch_class_name).split(".")[-1]
    if name not in ENCODERS:
        fail(f"architecture '{arch_class_name}' is not supported by Retina U-Net; use a plans configuration with "
             f"ResidualEncoderUNet or PlainConvUNet")
    enc_cls = ENCODERS[name]
    kwargs = _resolve_imports(arch_kwargs, arch_kwargs_req_import)
    accepted = set(inspect.signature(enc_cls.__init__).parameters) - {"self", "input_channels", "return_skips"}
    unknown = sorted(set(kwargs) - accepted - DECODER_ONLY_KWARGS)
    if unknown:
        fail(f"arch_kwargs keys {unknown} are not understood by {enc_cls.__name__}; check the plans' architecture")
    enc_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if enc_kwargs.get("conv_op") is not nn.Conv3d:
        fail(f"Retina U-Net is 3D only; the plans use conv_op={enc_kwargs.get('conv_op')} (pick a 3d configuration)")
    if enc_cls is ResidualEncoder:
        enc_kwargs.setdefault("disable_default_stem", False)
    return enc_cls(input_channels=num_input_channels, return_skips=True, **enc_kwargs)


def build_retina_unet(
    arch_class_name: str,
    arch_kwargs: dict,
    num_input_channels: int,
    num_classes: int,
    anchor_sizes: Optional[AnchorPlan | dict | Sequence] = None,
    arch_kwargs_req_import: Sequence[str] = DEFAULT_REQ_IMPORT,
    **overrides,
) -> RetinaUNet:
    """Build a Retina U-Net from an nnU-Net plans architecture entry.

    Args:
        arch_class_name / arch_kwargs / arch_kwargs_req_import: the plans' ``network_arch_class_name``,
            ``network_arch_init_kwargs`` and ``network_arch_init_kwargs_req_import`` (class-path strings are
            resolved with ``pydoc.locate`` as nnU-Net does).
        num_input_channels: image channels. num_classes: foreground detection classes.
        anchor_sizes: an :class:`AnchorPlan` (or its ``to_dict()``) from :func:`plan_anchors`, or explicit per
            level ``(widths, heights, depths)``; ``None`` = nnDetection's initial sizes (4, 8, 16) per axis
            scaled by each level's relative stride.
        **overrides: fields of :class:`RetinaUNetConfig` (e.g. ``head_channels=32``, ``nms_iou=0.5``).

    Returns:
        an initialised :class:`RetinaUNet` in training mode (encoder/decoder: nnU-Net's He init; heads:
        N(0, 0.01) with prior bias).
    """
    if num_classes < 1:
        fail(f"num_classes must be >= 1 (foreground detection classes), got {num_classes}")
    cfg = RetinaUNetConfig().with_overrides(**overrides)
    encoder = build_encoder(arch_class_name, arch_kwargs, num_input_channels, arch_kwargs_req_import)
    n_stages = len(encoder.output_channels)
    strides = [tuple(s) for s in encoder.strides]
    kernels = [k if isinstance(k, (list, tuple)) else (k,) * 3 for k in encoder.kernel_sizes]
    if any(v != 1 for v in strides[0]):
        fail(f"the first encoder stage must have stride 1 (got {strides[0]}); the segmentation head needs a "
             f"full-resolution level")
    levels = tuple(cfg.decoder_levels) if cfg.decoder_levels is not None else default_decoder_levels(n_stages)
    if not levels or sorted(set(levels)) != list(levels) or levels[0] < 0 or levels[-1] >= n_stages:
        fail(f"decoder_levels {levels} must be ascending encoder stage indices in [0, {n_stages})")

    fpn = cfg.fpn_channels if cfg.fpn_channels is not None else 4 * int(encoder.output_channels[0])
    channels = ufpn_channels(n_stages, levels[0], fpn, cfg.min_decoder_channels)
    decoder = UFPNDecoder(encoder.output_channels, strides, kernels, channels, sorted({0, *levels}))

    plan = _anchor_plan(anchor_sizes, strides, levels)
    generator = AnchorGenerator(plan.sizes_per_level() if isinstance(plan, AnchorPlan) else plan)
    a = generator.num_anchors_per_location
    classifier = ClassificationHead(fpn, a, num_classes, cfg.head_channels, cfg.head_convs, cfg.head_group_channels,
                                    cfg.prior_prob)
    regressor = RegressionHead(fpn, a, len(levels), cfg.head_channels, cfg.head_convs, cfg.head_group_channels,
                               cfg.learn_scale)
    segmenter = SegmentationHead(channels[0])

    he = InitWeights_He(1e-2)
    encoder.apply(he)
    if isinstance(encoder, ResidualEncoder):
        encoder.apply(init_last_bn_before_add_to_0)
    decoder.apply(he)
    segmenter.apply(he)
    return RetinaUNet(
        encoder, decoder, classifier, regressor, segmenter, generator,
        ATSSMatcher(cfg.num_candidates, cfg.center_in_gt),
        HardNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction, cfg.pool_size, cfg.min_neg),
        BoxCoder(tuple(cfg.coder_weights), cfg.coder_clip), levels, num_classes, cfg,
    )


def _anchor_plan(anchor_sizes, strides, levels):
    factors = relative_level_factors(strides, levels)
    if anchor_sizes is None:
        return default_anchor_plan(factors)
    if isinstance(anchor_sizes, dict):
        anchor_sizes = AnchorPlan.from_dict(anchor_sizes)
    if isinstance(anchor_sizes, AnchorPlan):
        if len(anchor_sizes.level_factors) != len(levels):
            fail(f"anchor plan has {len(anchor_sizes.level_factors)} levels but the detector uses {len(levels)} "
                 f"detection levels {levels}; re-plan anchors with relative_level_factors(strides, levels)")
        return anchor_sizes
    sizes = list(anchor_sizes)
    if len(sizes) != len(levels):
        fail(f"anchor_sizes gives {len(sizes)} levels but the detector uses {len(levels)} detection levels {levels}")
    return sizes

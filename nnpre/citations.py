"""Papers to cite for a pretrained checkpoint, in the ``citations`` layout nnssl release checkpoints carry.

Each entry is ``{"type", "name", "apa_citations": [...]}``; nnU-Net master copies a checkpoint's top-level
``citations`` list into its fine-tuning plans (``experiment_planning/like_nnssl.py``) and prints it when
training starts (``PretrainedTrainer.print_citations`` reads ``type``, ``name`` and ``apa_citations`` or
``bibtex_citations``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

NNUNET = ("Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a "
          "self-configuring method for deep learning-based biomedical image segmentation. Nature Methods, 18(2), "
          "203-211.")
RESENC = ("Isensee, F., Wald, T., Ulrich, C., Baumgartner, M., Roy, S., Maier-Hein, K., & Jaeger, P. F. (2024). "
          "nnU-Net revisited: A call for rigorous validation in 3D medical image segmentation. MICCAI 2024.")

#: Pretext task (nnpre registry name) → (method name, APA citations).
PRETEXT_CITATIONS: Dict[str, tuple] = {
    "mae": ("Masked autoencoder (3D, nnssl recipe)", [
        "He, K., Chen, X., Xie, S., Li, Y., Dollár, P., & Girshick, R. (2022). Masked autoencoders are scalable "
        "vision learners. CVPR 2022, 16000-16009.",
        "Wald, T., et al. (2025). Revisiting MAE pre-training for 3D medical image segmentation. CVPR 2025."]),
    "model_genesis": ("Models Genesis", [
        "Zhou, Z., Sodha, V., Pang, J., Gotway, M. B., & Liang, J. (2021). Models Genesis. Medical Image "
        "Analysis, 67, 101840."]),
    "diffusion": ("Denoising diffusion pretraining", [
        "Ho, J., Jain, A., & Abbeel, P. (2020). Denoising diffusion probabilistic models. NeurIPS 33, 6840-6851."]),
    "s3d": ("Sparse masked modelling (SparK)", [
        "Tian, K., Jiang, Y., Diao, Q., Lin, C., Wang, L., & Yuan, Z. (2023). Designing BERT for convolutional "
        "networks: Sparse and hierarchical masked modeling. ICLR 2023."]),
    "voco": ("Volume contrast (VoCo)", [
        "Wu, L., Zhuang, J., & Chen, H. (2024). VoCo: A simple-yet-effective volume contrastive learning framework "
        "for 3D medical image analysis. CVPR 2024."]),
}
#: Short names some checkpoints use for the same tasks.
_ALIASES = {"mg": "model_genesis"}


def citations_for(pretext: Optional[str], network_class: Optional[str],
                  existing: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The checkpoint's ``citations`` list: ``existing`` entries first (kept verbatim), then the pretraining
    method (when nnpre knows ``pretext``), the architecture and nnU-Net, each name once."""
    out = [copy.deepcopy(e) for e in (existing or []) if isinstance(e, dict)]
    names = {(e.get("type"), e.get("name")) for e in out}

    def add(kind: str, name: str, papers: List[str]) -> None:
        if (kind, name) not in names:
            out.append({"type": kind, "name": name, "apa_citations": list(papers)})
            names.add((kind, name))

    key = _ALIASES.get(str(pretext), str(pretext))
    if key in PRETEXT_CITATIONS:
        add("pretraining method", *PRETEXT_CITATIONS[key])
    if network_class == "ResidualEncoderUNet":
        add("architecture", "ResidualEncoderUNet (nnU-Net ResEnc)", [RESENC])
    add("framework", "nnU-Net", [NNUNET])
    return out

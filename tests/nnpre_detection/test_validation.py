"""Patch-level validation mAP (nnDetection's checkpoint selection)."""
import pytest
import torch

from nnpre_detection.validation import PatchEvaluator, validation_map


def test_patch_evaluator_hand_case():
    ev = PatchEvaluator(1)
    gt = {"boxes": torch.tensor([[0.0, 0, 4, 4, 0, 4]]), "labels": torch.tensor([0])}
    hit = {"boxes": torch.tensor([[0.0, 0, 4, 4, 0, 4]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    miss = {"boxes": torch.tensor([[10.0, 10, 14, 14, 10, 14]]), "scores": torch.tensor([0.95]),
            "labels": torch.tensor([0])}
    ev.add([hit, miss], [gt, gt])  # two patches: one TP (0.9) and one FP scored higher (0.95)
    assert len(ev) == 2
    m = ev.finish()
    # ranked: FP (0.95), TP (0.9); 2 GT -> recall 0.5 at precision 0.5; recall points 0..0.5 (51 of 101)
    assert m["AP_IoU_0.10_MaxDet_100"] == pytest.approx(51 * 0.5 / 101, abs=1e-6)
    assert len(ev) == 0 and ev.finish() == {}


class _Oracle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.num_classes = 1

    def predict_patch(self, x):
        assert not self.training
        return [{"boxes": torch.tensor([[0.0, 0, 4, 4, 0, 4]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])} for _ in range(x.shape[0])]


def test_validation_map_restores_mode():
    m = _Oracle().train()
    gt = [{"boxes": torch.tensor([[0.0, 0, 4, 4, 0, 4]]), "labels": torch.tensor([0])}] * 2
    out = validation_map(m, [(torch.zeros(2, 1, 8, 8, 8), gt)])
    assert out["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] == pytest.approx(1.0) and m.training

"""``nnPre_demo`` end to end at a minimal size: every stage, the report, and resuming."""
import json
import math
import os

import pytest

from nnpre.errors import NnPreError

TINY = ["--labelled", "1", "--seeds", "1", "--pretrain-epochs", "1", "--pretrain-iterations", "2",
        "--detect-epochs", "1", "--detect-iterations", "2",
        "--finetune-epochs", "1", "--finetune-iterations", "2", "--n-train", "2", "--n-test", "2", "--n-pool", "2"]


def _run(out, *extra):
    from nnpre.cli.demo import build_parser, run

    return run(build_parser().parse_args(["--out", str(out), *TINY, *extra]))


def test_demo_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    # the demo points nnU-Net's variables at its own folder; monkeypatch restores them afterwards
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "unused"))
    monkeypatch.setenv("nnUNet_compile", "false")
    out = tmp_path / "demo"
    assert _run(out) == 0
    printed = capsys.readouterr().out
    rep = out / "report"
    for name in ("report.md", "results.json", "loss_curves.png", "froc_curves.png", "preview_mae.png",
                 "preview_mg.png", "preview_diffusion.png", "seg_dice_vs_labelled.png",
                 "det_AP_IoU_0.10_vs_labelled.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    with open(rep / "results.json") as f:
        res = json.load(f)
    assert res["methods"] == ["scratch", "mae", "mg", "diffusion"]
    # every method has finite numbers for every reported metric
    for task, metric in (("seg", "dice"), ("seg", "FROC_IoU_0.10"), ("det", "AP_IoU_0.10"), ("det", "FROC_IoU_0.10")):
        for m in res["methods"]:
            v = res["table"][task][metric][m]["1"][0]
            assert v is not None and math.isfinite(v) and 0.0 <= v <= 1.0, (task, metric, m, v)
    for m in ("mae", "mg", "diffusion"):
        losses = res["results"][f"pretrain_{m}"]["train_losses"]
        assert len(losses) == 1 and math.isfinite(losses[0])
    md = (rep / "report.md").read_text()
    assert "| diffusion |" in md and "## Calibration" in md and "Does pretraining beat scratch?" in md
    assert "Lesion Dice" in printed or "lesion Dice" in printed
    assert "Difficulty 'cpu':" in md and "This run, scratch lesion Dice: 1 labelled" in md
    assert all(json.loads(p.read_text())["seconds"] > 0 for p in (out / "stages").iterdir())

    # rerun: everything is skipped (no stage record rewritten)
    stages = out / "stages"
    before = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    assert _run(out) == 0
    assert {p.name: p.stat().st_mtime_ns for p in stages.iterdir()} == before
    assert "reused from an earlier one" in (rep / "report.md").read_text()

    # a stage whose output vanished is recomputed, the others are not
    with open(stages / "seg_mae_n1_s0.json") as f:
        ck = json.load(f)["files"][0]
    os.remove(ck)
    assert _run(out) == 0
    after = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    assert os.path.isfile(ck)
    assert [k for k in after if after[k] != before[k]] == ["seg_mae_n1_s0.json"]

    # adapter arms on the same study folder: only the new arms train (LoRA, MLP probe; probe-mlp has no detection
    # arm), each in its own run folder, and the report shows them with their trainable-parameter counts
    assert _run(out, "--methods", "mae", "--adapters", "full,lora,probe-mlp") == 0
    assert "note: no detection arms for adapter probe-mlp" in capsys.readouterr().out
    arms = {p.name: p.stat().st_mtime_ns for p in stages.iterdir()}
    assert sorted(k for k in arms if arms[k] != after.get(k)) == [
        "det_mae_n1_s0_lora.json", "seg_mae_n1_s0_lora.json", "seg_mae_n1_s0_probe-mlp.json"]
    res = json.loads((rep / "results.json").read_text())
    assert res["arms"] == {"seg": ["scratch", "mae", "mae+lora", "mae+probe-mlp"],
                           "det": ["scratch", "mae", "mae+lora"]}
    for task, metric in (("seg", "dice"), ("det", "AP_IoU_0.10")):
        for arm in res["arms"][task]:
            v = res["table"][task][metric][arm]["1"][0]
            assert v is not None and math.isfinite(v) and 0.0 <= v <= 1.0, (task, arm, v)
    lora = res["results"]["seg_mae_n1_s0_lora"]
    assert lora["folder"].endswith("nnPreFineTuneTrainer__nnPreResEncLPlans_mae_n1_s0_lora__3d_fullres/fold_all")
    p = res["params"]
    assert p["seg"]["scratch"]["trainable"] == p["seg"]["scratch"]["total"] == p["seg"]["mae"]["trainable"]
    assert 0 < p["seg"]["mae+lora"]["added"] < p["seg"]["mae+lora"]["trainable"] < p["seg"]["mae+lora"]["total"]
    assert 0 < p["seg"]["mae+probe-mlp"]["trainable"] < p["seg"]["mae+lora"]["trainable"]
    assert p["det"]["mae+lora"]["adapter"] == "lora" and "mae+probe-mlp" not in p["det"]
    md = (rep / "report.md").read_text()
    assert "| mae+lora |" in md and "## Trainable parameters per arm" in md and "| seg | mae+probe-mlp |" in md
    assert "match full fine-tuning" in md


@pytest.mark.parametrize("args, msg", [
    (["--labelled", "3"], "--labelled sizes must be between 1 and the 2"),
    (["--labelled", "a"], "--labelled expects comma-separated integers"),
    (["--methods", "mae,simclr"], "unknown pretext method(s) ['simclr']"),
    (["--adapters", "full,lorra"], "unknown adapter(s) ['lorra']; choose from full, lora, molre, probe-linear"),
    (["--adapters", ","], "--adapters is empty"),
])
def test_demo_bad_arguments(tmp_path, args, msg):
    with pytest.raises(NnPreError, match=None) as e:
        _run(tmp_path / "x", *args)
    assert msg in str(e.value)


def test_demo_dry_run_prints_grid_and_estimate(tmp_path, capsys):
    from nnpre.cli.demo import build_parser, run

    out = tmp_path / "never"
    assert run(build_parser().parse_args(["--out", str(out), "--preset", "gpu", "--dry-run"])) == 0
    text = capsys.readouterr().out
    assert "methods: mae, mg, diffusion (+ scratch)" in text and "labelled sizes: 2, 8" in text
    assert "pretraining: 3 run(s) x 20x250" in text and "estimated time" in text
    assert not out.exists()  # nothing trained, nothing written
    assert run(build_parser().parse_args(["--out", str(out), "--dry-run", "--methods", "all", "--seeds", "2"])) == 0
    text = capsys.readouterr().out
    from nnpre.study import available_methods

    assert f"methods: {', '.join(available_methods())} (+ scratch)" in text and "seeds: 2" in text


def test_demo_dry_run_lists_adapter_arms(tmp_path, capsys):
    from nnpre.cli.demo import build_parser, run

    out = tmp_path / "never"
    args = ["--out", str(out), "--methods", "mae,mg", "--labelled", "2", "--dry-run"]
    assert run(build_parser().parse_args(args)) == 0
    plain = capsys.readouterr().out
    assert run(build_parser().parse_args([*args, "--adapters", "full,lora,probe-mlp"])) == 0
    text = capsys.readouterr().out
    assert "adapters: full, lora, probe-mlp" in text
    assert "segmentation fine-tuning: 7 run(s)" in text and "arms: scratch, mae, mae+lora, mae+probe-mlp, mg" in text
    assert "detection fine-tuning: 5 run(s)" in text and "note: no detection arms for adapter probe-mlp" in text
    total = [ln for ln in text.splitlines() if "estimated time" in ln][0]
    assert total != [ln for ln in plain.splitlines() if "estimated time" in ln][0]  # the arms cost time
    assert not out.exists()



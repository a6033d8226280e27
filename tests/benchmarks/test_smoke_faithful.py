"""Tests for ``benchmarks/smoke_faithful.py``: stage list, placeholders, and a ``--quick`` run end to end."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "smoke_faithful.py")


def _load():
    spec = importlib.util.spec_from_file_location("smoke_faithful", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["smoke_faithful"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_enumerates_every_registered_pretext_task(capsys, tmp_path):
    from nnpre_trainers.pretext import list_pretexts

    sf = _load()
    assert sf.main(["--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split(":", 1)[0] for ln in lines]
    tasks = list_pretexts()
    assert len(tasks) >= 3
    for t in tasks:
        assert f"pretrain {t}" in names and f"finetune {t}" in names
    assert names[:4] == ["synth", "plan labelled", "plan pool", sf.REFERENCE]
    assert names[-3:] == ["detect mae", "predict", "evaluate"]
    faithful = dict(ln.split(": ", 1) for ln in lines)
    assert "--preset gpu" in faithful["plan labelled"] and "--fov 160.0" in faithful["synth"]
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_step_time_skips_warmup_and_placeholders_resolve(tmp_path):
    sf = _load()
    assert sf._step_time([]) is None
    assert sf._step_time([9.0]) == 9.0
    assert sf._step_time([9.0, 1.0, 3.0]) == 2.0
    done = {"pretrain mae": sf.Stage("pretrain mae", "nnPre_train", [], output_folder=str(tmp_path / "p")),
            "detect mae": sf.Stage("detect mae", "nnPre_train", [], output_folder=str(tmp_path / "d"))}
    argv = sf._resolve(["--pretrained", "<checkpoint of pretrain mae>", "-m", "<model of detect mae>"], done)
    assert argv == ["--pretrained", str(tmp_path / "p" / "checkpoint_final.pth"), "-m", str(tmp_path / "d")]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    env = dict(os.environ, nnUNet_n_proc_DA="1")
    # about 60 s of CPU time (mostly imports of 9 fresh processes); the timeout leaves room for a loaded machine
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--bf16", "--tasks", "mae", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.load(open(out / "smoke_faithful.json"))
    stages = {s["name"]: s for s in rec["stages"]}
    assert list(stages) == ["synth", "plan labelled", "plan pool", "reference nnUNetTrainer", "pretrain mae",
                            "finetune mae", "detect mae", "predict", "evaluate"]
    assert all(s["rc"] == 0 and s["max_rss_mib"] > 50 for s in stages.values())
    for name in ("reference nnUNetTrainer", "pretrain mae", "finetune mae", "detect mae"):
        s = stages[name]
        assert s["n_steps"] == 2 and s["step_s"] > 0 and s["patch_size"] == [32, 32, 32] and s["batch_size"] == 2
    assert stages["reference nnUNetTrainer"]["output_folder"].endswith(
        os.path.join("nnUNetTrainer__nnPreResEncLPlans__3d_fullres", "fold_0"))
    ckpt = os.path.join(stages["pretrain mae"]["output_folder"], "checkpoint_final.pth")
    assert ckpt in stages["finetune mae"]["argv"] and ckpt in stages["detect mae"]["argv"]
    assert stages["detect mae"]["output_folder"] in stages["predict"]["argv"]
    assert os.listdir(out / "predictions") == ["test_0000.json"]
    det = json.load(open(out / "evaluation" / "det.json"))
    assert any("AP_IoU_0.10" in k for k in json.dumps(det).split('"'))
    # the printed table has one row per stage, ratios against the reference
    table = proc.stdout[proc.stdout.index("smoke run"):]
    assert "bf16 autocast" in table
    assert sum(1 for ln in table.splitlines() if ln.strip().startswith(tuple(stages))) >= len(stages)
    assert " 1.00 " in [ln for ln in table.splitlines() if ln.strip().startswith("reference nnUNetTrainer")][0]

"""DDP on CPU (gloo): ``torchrun --nproc_per_node=2 -m nnpre.cli.train`` for pretraining, fine-tuning from that
checkpoint and detection; both ranks end every run with identical weights, rank 0 writes the checkpoint, and the
global batch size of the plans is split over the ranks (nnU-Net's ``_set_batch_size_and_oversample``)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from planners.pipeline import plan_dataset

# Runs in each torchrun process: the three nnPre_train commands one after the other in the same process group
# (pretraining -> fine-tuning from its checkpoint -> detection), each rank saving its final weights.
RANK_SCRIPT = r'''
import json, os, sys
import torch
from nnpre_trainers.trainer import nnPreTrainer

out, runs = sys.argv[1], json.loads(sys.argv[2])
original_end = nnPreTrainer.on_train_end


def on_train_end(self):
    name = f"{self.task.name.replace(':', '_')}_rank{self.local_rank}"
    torch.save({k: v.detach().cpu() for k, v in self.unwrapped_network.state_dict().items()},
               os.path.join(out, name + ".pt"))
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"batch_size": self.batch_size, "is_ddp": self.is_ddp, "folder": self.output_folder}, f)
    original_end(self)


nnPreTrainer.on_train_end = on_train_end
from nnpre.cli.train import main

for argv in runs:
    assert main(argv) == 0, argv
'''


@pytest.mark.slow
def test_ddp_gloo_pretrain_finetune_detect(nnunet_root, tmp_path):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=71, n_cases=3)
    r = plan_dataset(71, preset="cpu-tiny", num_processes=1)
    global_batch = r.plans["configurations"]["3d_fullres"]["batch_size"]
    assert global_batch == 2
    out = tmp_path / "ranks"
    out.mkdir()
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    short = ["-d", "71", "-pl", "resenc-l", "-f", "all", "--epochs", "1", "--iterations", "2", "--device", "cpu"]
    pretrained = os.path.join(os.environ["nnUNet_results"], "Dataset071_T",
                              "nnPreTrainer_MAE__nnPreResEncLPlans__3d_fullres", "fold_all", "checkpoint_final.pth")
    runs = [["pretrain", "-t", "mae", *short],
            ["finetune", "--pretrained", pretrained, "--no-validation", *short],
            ["detect", *short]]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_n_proc_DA="0",
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", str(script),
           str(out), json.dumps(runs)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    log = res.stdout + res.stderr
    errors = [ln for ln in log.splitlines() if ln.startswith("error:") or "Error" in ln]
    assert res.returncode == 0, "\n".join(errors[-10:]) + "\n" + res.stdout[-1500:] + res.stderr[-3000:]
    assert "world size is 2" in log.lower().replace("the world size", "world size")

    for task in ("pretext_mae", "segmentation", "detection"):
        infos = [json.loads((out / f"{task}_rank{r}.json").read_text()) for r in (0, 1)]
        assert all(i["is_ddp"] for i in infos), task
        assert sum(i["batch_size"] for i in infos) == global_batch, (task, infos)  # global batch split over ranks
        assert os.path.isfile(os.path.join(infos[0]["folder"], "checkpoint_final.pth")), task  # rank 0 writes it
        w0, w1 = (torch.load(out / f"{task}_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert w0.keys() == w1.keys()
        different = [k for k in w0 if not torch.equal(w0[k], w1[k])]
        assert not different, f"{task}: ranks disagree on {different[:5]}"
        # rank 0's final weights are the checkpoint's
        ck = torch.load(os.path.join(infos[0]["folder"], "checkpoint_final.pth"), weights_only=True,
                        map_location="cpu")["network_weights"]
        assert all(torch.equal(ck[k].cpu(), w0[k]) for k in w0), task

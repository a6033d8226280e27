"""nnU-Net's own trainer lookup (``nnUNet_extTrainer``) finds every named nnpre trainer."""
import os
import subprocess
import sys

import nnpre_trainers

NAMES = ("nnPreTrainer_MAE", "nnPreTrainer_MG", "nnPreTrainer_Diffusion", "nnPreFineTuneTrainer",
         "nnPreDetectionTrainer")


def test_nnunet_lookup_finds_all_named_trainers():
    code = ("import sys\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "for n in sys.argv[1:]:\n"
            "    c = find(n)\n"
            "    print('FOUND', n, c.__name__, c.__module__)\n")
    env = dict(os.environ, nnUNet_extTrainer=nnpre_trainers.EXT_TRAINER_DIR)
    out = subprocess.run([sys.executable, "-c", code, *NAMES], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {line.split()[1]: line.split()[2] for line in out.stdout.splitlines() if line.startswith("FOUND")}
    assert found == {n: n for n in NAMES}

"""nnU-Net's own trainer lookup (``nnUNet_extTrainer``) finds every named nnpre trainer."""
import os
import subprocess
import sys

import nnpre_trainers
from nnpre_trainers.aliases import PRETEXT_ALIASES, alias_name
from nnpre_trainers.pretext import list_pretexts

NAMES = ("nnPreTrainer_MAE", "nnPreTrainer_MG", "nnPreTrainer_Diffusion", "nnPreFineTuneTrainer",
         "nnPreDetectionTrainer") + tuple(alias_name(t) for t in list_pretexts())


def test_every_registered_pretext_task_has_an_alias_and_a_cli_name():
    from nnpre.cli.train import build_parser
    from nnpre_trainers.aliases import resolve_pretext

    assert set(PRETEXT_ALIASES) == set(list_pretexts())
    for task, cls in PRETEXT_ALIASES.items():
        assert cls.pretext_name == task and cls.__name__ == alias_name(task)
        assert resolve_pretext(task) == task
    assert resolve_pretext("mg") == "model_genesis"
    helps = {a.dest: a.help for sp in build_parser()._subparsers._group_actions[0].choices.values()
             for a in sp._actions if a.dest == "task"}
    assert all(t in helps["task"] for t in list_pretexts())


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
    assert found == {n: n for n in set(NAMES)}

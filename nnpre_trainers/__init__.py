"""nnU-Net trainers of nnpre: pretraining with any pretext task, fine-tuning, and their data plumbing.

``EXT_TRAINER_DIR`` is the folder to put in ``nnUNet_extTrainer`` so stock ``nnUNetv2_train -tr`` and
``nnUNetv2_predict`` find nnpre's trainers by name.
"""
import os

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext")

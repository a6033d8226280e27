"""nnpre: pretraining and detection for nnU-Net v2.

The core package holds what the other packages share: user-facing errors, atomic file writes,
presets, synthetic data, checkpoints and weight transfer. It imports nothing from the trainers,
the detection package or the command line.
"""
__version__ = "0.1.0"

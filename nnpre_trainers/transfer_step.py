"""Encoder transfer as an explicit, run-once step of a training run.

:class:`EncoderTransfer` wraps :func:`nnpre.weight_transfer.transfer_encoder`: the trainer calls
:meth:`EncoderTransfer.apply` exactly once, on the freshly built network of a *new* run (after the task built
it, before an adapter and the optimizer see it). The report is

* printed to the run's log and written as ``pretrained_transfer.json`` in the run folder, and
* returned as a plain dict that the trainer stores in every checkpoint (``nnpre_transfer``).

A resumed run (``--c``) restores the network from its checkpoint, whose ``nnpre_transfer`` record says what
was transferred; the transfer is not run again (it would be overwritten by the checkpoint anyway).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from torch import nn

from nnpre.errors import fail
from nnpre.weight_transfer import transfer_encoder

#: File written into the run folder by :meth:`EncoderTransfer.apply`.
REPORT_FILE = "pretrained_transfer.json"


class EncoderTransfer:
    """Load the encoder (+ stem) of a pretrained checkpoint into a network, once.

    Args:
        checkpoint: path of an nnpre, nnssl/OpenMind or nnU-Net checkpoint (a file).
        channel_names: the target dataset's ``dataset.json['channel_names']`` (enables the by-name stem rule).
    """

    def __init__(self, checkpoint: str, channel_names: Any = None):
        if os.path.isdir(checkpoint):
            from nnpre.errors import checkpoint_folder_hint

            fail(checkpoint_folder_hint(checkpoint))  # names the checkpoint files found inside
        if not os.path.isfile(checkpoint):
            fail(f"pretrained checkpoint {checkpoint} does not exist; give the path of a .pth file")
        self.checkpoint = str(checkpoint)
        self.channel_names = channel_names

    def apply(self, network: nn.Module, run_folder: Optional[str] = None,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
        """Transfer into ``network`` (in place); log the report and save it in ``run_folder`` (if given).

        Returns:
            the report as a plain dict (:meth:`nnpre.weight_transfer.TransferReport.to_dict`) plus
            ``stem_remapped`` (bool) and ``checkpoint`` (the source path).
        """
        report = transfer_encoder(self.checkpoint, network, self.channel_names)
        log(report.summary())
        if run_folder is not None:
            report.save(os.path.join(run_folder, REPORT_FILE))
        record = dict(report.to_dict())
        record["stem_remapped"] = bool(report.stem_remapped)
        record["checkpoint"] = self.checkpoint
        return record

"""Stop an OLMo-core training gracefully from outside: a ``STOP`` file in its save folder.

Told to cancel, OLMo-core's trainer stops at its next cancel check (every
``train.cancel_check_interval_steps`` steps, when the ranks agree on it), saves a checkpoint
and returns; started again, it resumes from that checkpoint. ``StopFileCallback`` tells it to
when ``<save_folder>/STOP`` exists (rank 0 looks after every step). The SLURM launch scripts
create the file on SLURM's warning signal before the time limit.

Why not a signal: OLMo-core stops the same way on SIGTERM, but SLURM signals every process of
a job step and torchrun every rank's whole process group, so the data loader's worker
processes die too and the rank fails ("DataLoader worker ... exited unexpectedly") before it
can save (seen with torch 2.13's torchrun and a DataLoader with workers).
"""

import logging
import os
from dataclasses import dataclass

from olmo_core.distributed.utils import get_rank
from olmo_core.train.callbacks import Callback

__all__ = ["STOP_FILE", "StopFileCallback"]

STOP_FILE = "STOP"
log = logging.getLogger(__name__)


@dataclass
class StopFileCallback(Callback):
    """Cancel the run (OLMo-core's graceful stop) once ``<save_folder>/<file_name>`` exists."""

    file_name: str = STOP_FILE
    _requested: bool = False

    def post_step(self) -> None:
        if self._requested or get_rank() != 0:
            return
        path = os.path.join(str(self.trainer.save_folder), self.file_name)
        if os.path.exists(path):
            self._requested = True
            log.warning(f"{path} exists: stopping at the next cancel check, after a checkpoint")
            self.trainer.cancel_run(f"stop requested by {path}")

"""Test scaffolding imported by ``trd fit`` subprocesses (tests/test_resume.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback


class PauseForSignal(Callback):
    """After training step ``step``, write ``marker`` and wait (at most ``timeout`` s) for a SIGTERM.

    Lets the parent test send a real SIGTERM at a known step instead of racing the child's speed.
    """

    def __init__(self, step: int, marker: str, timeout: float = 120.0):
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)

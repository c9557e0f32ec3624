"""`PredictionWriter`: ``trd predict`` writes what it sampled to the run folder, as jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Write every prediction (``problem``, ``prompt``, ``response``, ``verified``) to
    ``<dirpath>/predictions.jsonl`` at the end of ``predict`` (``predictions.rank{R}.jsonl`` per
    rank when several processes predict), atomically, and say where.

    Args:
        dirpath: where to write; default: the logger's run folder (``trainer.log_dir``), else
            ``default_root_dir``.
    """

    def __init__(self, dirpath: str | None = None):
        super().__init__(write_interval="epoch")
        self.dirpath = dirpath
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        self.path = folder / name
        records = [r for batch in predictions for r in batch]
        tmp = self.path.with_name(f".{name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        rank_zero_info(f"wrote {len(records)} predictions to {self.path}")

"""`PreemptionCheckpoint`: SIGTERM (a pre-empted or cancelled job) -> ``preempted.ckpt``, clean stop.

Lightning 2.6 only *notes* a SIGTERM: the running training step finishes, then the loop raises
`SIGTERMException` (a `SystemExit`) and nothing is saved (its SLURM path saves only on the requeue
signal, with auto-requeue on). This callback saves a full checkpoint at that point (student,
optimizer, schedulers, loop counters, data position and random state; see `trd_lightning.resume`),
so ``trd fit ... --ckpt_path <dir>/preempted.ckpt`` continues as if nothing had happened.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PreemptionCheckpoint(Callback):
    """Save ``<dirpath>/<filename>`` when the run receives SIGTERM, then let it stop.

    ``trd fit`` adds it to every run whose config has none. Under DDP the ranks agree on a SIGTERM
    at each batch end, so all of them stop after the same step, save together and exit.

    Only SIGTERM: a crash (a bug, a non-finite loss with ``nonfinite="raise"``) is not a state to
    resume from. The process then exits with status 143 (128 + SIGTERM, what a shell reports for a
    process ended by SIGTERM) rather than Lightning's 0, so a scheduler does not mistake the
    interrupted run for a finished one.

    Args:
        dirpath: where to write; default: the `ModelCheckpoint`'s folder if the trainer has one,
            else ``<default_root_dir>/checkpoints``.
        filename: the checkpoint's file name.
    """

    EXIT_CODE = 128 + int(signal.SIGTERM)

    def __init__(self, dirpath: str | None = None, filename: str = "preempted.ckpt"):
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: Path | None = None

    def checkpoint_path(self, trainer: Trainer) -> Path:
        folder = self.dirpath
        if folder is None:
            ckpt = trainer.checkpoint_callback
            folder = getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning's SIGTERM handler broadcasts from inside the signal handler, i.e. at whatever
        # collective the rank happens to be in, and each rank then stops at its own moment: under
        # DDP one rank waits in the save's barrier and the other in that broadcast, forever. Here
        # the handler only notes the signal (and forwards it to the launched ranks, as Lightning
        # does); the ranks agree on it at a batch end, all together (`_agree_on_sigterm`).
        connector = trainer._signal_connector

        def note_sigterm(signum, frame) -> None:
            if not connector.received_sigterm:
                launcher = trainer.strategy.launcher
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)
            connector.received_sigterm = True

        connector._sigterm_notifier_fn = note_sigterm

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        _agree_on_sigterm(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit":
            _agree_on_sigterm(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        path = self.checkpoint_path(trainer)
        _close_finished_epoch(trainer)
        _restart_interrupted_validation(trainer)
        trainer.save_checkpoint(path)  # every rank calls it; the strategy writes once
        self.saved_path = path
        exception.code = self.EXIT_CODE
        rank_zero_info(
            f"SIGTERM: saved {path} after step {trainer.global_step}; resume with --ckpt_path {path}"
        )


def _agree_on_sigterm(trainer: Trainer) -> None:
    """Every rank at the same batch end: if any rank got SIGTERM, all stop after this batch."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    flag = torch.tensor([1 if trainer.received_sigterm else 0], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        trainer._signal_connector.received_sigterm = True


def _restart_interrupted_validation(trainer: Trainer) -> None:
    """Lightning stops a validation between batches on SIGTERM, and on resume it treats a
    validation stopped *between* batches as finished: it skips the rest, and the metrics of the
    part already run are lost. Rewind the validation's counters to "its first batch started, none
    processed", the one state from which Lightning re-runs a validation on resume, from batch 0."""
    if not trainer.validating:
        return
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    done = progress.current.completed
    for counter in (progress.total, progress.current):
        counter.ready -= done - 1
        counter.started -= done - 1
        counter.processed -= done
        counter.completed -= done


def _close_finished_epoch(trainer: Trainer) -> None:
    """After an epoch's last batch Lightning raises only once the epoch is closed, but before the
    next epoch resets the per-epoch batch counters. Saved as they are, a resumed run would count the
    finished epoch's batches against the next one and cut it short; reset them as the next epoch's
    start would."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    epoch_closed = fit_loop.epoch_progress.current.completed == fit_loop.epoch_progress.current.ready
    if epoch_closed and epoch_loop.batch_progress.current.completed >= trainer.num_training_batches:
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()

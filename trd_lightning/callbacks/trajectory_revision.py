"""`TrajectoryRevision`: revise each training batch's rollouts before the loss (TRD)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from trd_lightning.revision import Reviser


class TrajectoryRevision(Callback):
    """Trains on the reviser's ``y_r`` instead of the student's rollout ``y_o``.

    Plugs into any LightningModule that implements `trd_lightning.protocol.RolloutModel` and
    whose batches carry a `Rollout` under ``"rollout"`` when ``on_train_batch_start`` runs (with
    `PromptDataModule`: ``module.make_rollout``, from the current weights). The paper trains on
    ``y_r`` with forward KL: set the module's loss to ``forward_kl``. Two ways, by the reviser:

    * a fused reviser (``reviser.fused``, e.g. `PrefixSpliceReviser` with ``refine="all"``) is
      plugged into the module with ``set_rollout_reviser`` in ``setup`` (unplugged in
      ``teardown``), so ``make_rollout`` samples each training rollout already revised, in one
      decode; ``on_train_batch_start`` finds it revised and only logs. The statistics that need
      the unrevised ``y_o`` are then absent, and the time is logged as
      ``revision/rollout_seconds`` (sampling and revision together).
    * otherwise ``on_train_batch_start`` replaces ``batch["rollout"]`` by
      ``reviser.revise(module, rollout)``, which keeps ``y_o`` as its ``original``.

    Logged every step under ``revision/``: fraction revised, mean ``t*`` (the splice point, or for
    rewrites the first position where ``y_r`` departs from ``y_o``), fail->pass and pass->fail
    rates under the task's verifier, mean lengths of ``y_o`` and ``y_r``, and wall-clock seconds
    spent revising versus the rest of the step (rollout + scoring + update), whose ratio is the
    revision overhead the paper did not report.

    Args:
        reviser: how ``y_o`` becomes ``y_r``: `trd_lightning.revision.PrefixSpliceReviser` (token
            level, ours), `trd_lightning.revision.RewriteReviser` (the paper's rewrite), or a
            baseline of `trd_lightning.baselines`.
    """

    def __init__(self, reviser: Reviser):
        if not isinstance(reviser, Reviser):
            raise TypeError(f"reviser must be a trd_lightning.revision.Reviser, got {type(reviser).__name__}")
        self.reviser = reviser
        self._step_start: float | None = None
        self._pending: dict[str, float] = {}
        self.history: list[dict] = []

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.reviser.setup(pl_module)
        if self.reviser.fused:
            pl_module.set_rollout_reviser(self.reviser)  # training rollouts are sampled already revised

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if pl_module.rollout_reviser is self.reviser:
            pl_module.set_rollout_reviser(None)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            raise RuntimeError(
                "TrajectoryRevision found no batch['rollout']: use PromptDataModule (it attaches rollouts) "
                "or attach a trd_lightning.rollout.Rollout to the batch before on_train_batch_start"
            )
        stats = {f"revision/{k}": float(v) for k, v in self._revise(pl_module, batch).stats.items()}
        if self._revise_seconds is not None:
            stats["revision/seconds"] = self._revise_seconds
        self._pending = stats
        self._step_start = time.perf_counter()

    def _revise(self, pl_module, batch: dict):
        """The batch's revised rollout: as sampled when fused (no separate revision time: the
        throughput benchmark measures the fused step against OPD), else revised here."""
        rollout = batch["rollout"]
        if rollout.fused:
            self._revise_seconds = None
            return rollout
        start = time.perf_counter()
        with torch.no_grad():
            revised = self.reviser.revise(pl_module, rollout).replace(original=rollout)
        self._revise_seconds = time.perf_counter() - start
        batch["rollout"] = revised
        return revised

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._pending
        rollout = batch["rollout"]
        if rollout.fused:
            stats["revision/rollout_seconds"] = rollout.seconds  # sampling and revision together
            stats["revision/rest_seconds"] = time.perf_counter() - self._step_start
        else:
            rollout_seconds = rollout.original.seconds or 0.0
            stats["revision/rest_seconds"] = time.perf_counter() - self._step_start + rollout_seconds
            stats["revision/overhead"] = stats["revision/seconds"] / max(stats["revision/rest_seconds"], 1e-9)
        self.history.append(stats)
        bs = len(rollout.problems)
        for name, value in stats.items():
            if value == value:  # NaN (e.g. no t* in this batch) would poison the epoch mean
                pl_module.log(name, value, batch_size=bs, prog_bar=name == "revision/fraction_revised")

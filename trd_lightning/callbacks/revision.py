"""`TrajectoryRevision`: revise each training batch's rollouts before the loss (TRD)."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.revision import Reviser


# Bookkeeping in `Rollout.info` that is not a revision statistic (each logged key costs Lightning
# about half a millisecond per step).
_NOT_LOGGED = {"seconds", "decode_steps"}


class TrajectoryRevision(Callback):
    """Replaces ``batch["rollout"]`` (``y_o``) by the reviser's ``y_r`` in ``on_train_batch_start``.

    Plugs into any LightningModule whose batches carry a `Rollout` under ``"rollout"`` when
    ``on_train_batch_start`` runs and that implements `trd_lightning.protocol.RolloutModel`
    (``task``, ``tokenizer``, ``sample``, ``score``, ``teacher_prompt``, and ``model_for`` for the
    splice reviser). With `PromptDataModule` the rollout is attached on the fly from the current
    weights. The paper trains on ``y_r`` with forward KL: set the module's loss to ``forward_kl``.

    Logged every step under ``revision/``: fraction revised, mean ``t*`` (the splice point, or for
    rewrites the first position where ``y_r`` departs from ``y_o``), fail->pass and pass->fail
    rates under the task's verifier, mean lengths of ``y_o`` and ``y_r``, and wall-clock seconds
    spent revising versus the rest of the step (rollout + scoring + update), whose ratio is the
    revision overhead the paper did not report.

    A fused reviser (``reviser.fused``, e.g. `PrefixSpliceReviser` with ``refine="all"``) is handed to
    the module's ``fused_reviser`` hook, so training rollouts are sampled already revised; the
    statistics that need the unrevised ``y_o`` are then absent, and the time is logged as
    ``revision/rollout_seconds`` (sampling and revision together).
    """

    def __init__(self, reviser: Reviser):
        if not isinstance(reviser, Reviser):
            raise TypeError(f"reviser must be a trd_lightning.revision.Reviser, got {type(reviser).__name__}")
        self.reviser = reviser
        self._step_start = self._revise_seconds = None
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.reviser.setup(pl_module)
        if getattr(self.reviser, "fused", False):
            if hasattr(pl_module, "fused_reviser"):
                pl_module.fused_reviser = self.reviser  # training rollouts are sampled already revised
            else:
                rank_zero_info(
                    f"{type(pl_module).__name__} has no `fused_reviser` hook: {type(self.reviser).__name__} runs "
                    "two-pass (revising each finished rollout), which gives the same distribution of y_r at a higher cost"
                )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "fused_reviser", None) is self.reviser:
            pl_module.fused_reviser = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            raise RuntimeError(
                "TrajectoryRevision found no batch['rollout']: use PromptDataModule (it attaches rollouts) "
                "or attach a trd_lightning.rollout.Rollout to the batch before on_train_batch_start"
            )
        if rollout.info.get("fused"):
            # Sampled and revised in one decode: nothing left to do here, and no separate revision
            # time to report (benchmarks/throughput.py measures the fused step against OPD).
            revised, self._revise_seconds = rollout, None
        else:
            start = time.perf_counter()
            with torch.no_grad():
                revised = self.reviser.revise(pl_module, rollout)
            self._revise_seconds = time.perf_counter() - start
            revised.info["original"] = rollout
            batch["rollout"] = revised
        self._step_start = time.perf_counter()
        stats = {
            f"revision/{k}": float(v)
            for k, v in revised.info.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_LOGGED
        }
        if self._revise_seconds is not None:
            stats["revision/seconds"] = self._revise_seconds
        self._pending = stats

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._pending
        rollout = batch["rollout"]
        if rollout.info.get("fused"):
            stats["revision/rollout_seconds"] = rollout.info["seconds"]  # sampling and revision together
            stats["revision/rest_seconds"] = time.perf_counter() - self._step_start
        else:
            rollout_seconds = rollout.info["original"].info.get("seconds", 0.0)
            stats["revision/rest_seconds"] = time.perf_counter() - self._step_start + rollout_seconds
            stats["revision/overhead"] = stats["revision/seconds"] / max(stats["revision/rest_seconds"], 1e-9)
        self.history.append(stats)
        bs = len(batch["rollout"].problems)
        for name, value in stats.items():
            if value == value:  # NaN (e.g. no t* in this batch) would poison the epoch mean
                pl_module.log(name, value, batch_size=bs, prog_bar=name == "revision/fraction_revised")

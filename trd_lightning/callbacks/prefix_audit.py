"""`PrefixAudit`: prefix-failure diagnostics of the training rollouts, every N steps."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback

from trd_lightning.audit import json_safe, diagnose, first_errors, rollout_traces, summarize
from trd_lightning.diagnostics import check_criterion, onset_token_ids
from trd_lightning.rollout import decode_and_verify


class PrefixAudit(Callback):
    """Every ``every_n_steps`` optimizer steps, diagnoses ``batch["rollout"]``: logs ``audit/*``
    scalars (and histograms, with a logger that has ``experiment.add_histogram`` such as
    TensorBoard) and appends per-rollout traces to ``<log_dir>/audit/traces.jsonl``.

    Not due: one integer comparison, nothing scored. Due: one teacher and one student forward
    pass under ``no_grad`` (the statistics of `trd_lightning.diagnostics`).

    Uses only the `RolloutModel` protocol (``task``, ``tokenizer``, ``score``) and a `Rollout` under
    ``batch["rollout"]`` in ``on_train_batch_start``. Callbacks run in list order: placed after
    `TrajectoryRevision`, it finds the revised rollout with the raw one in ``info["original"]`` and
    audits both (``audit/revised/*``); placed before, it sees the raw rollout only. With a fused
    splice reviser the batch holds only the revised rollout (no raw one was finished): it is
    audited under ``audit/revised/*``; use ``PrefixSpliceReviser(fused=False)`` to audit raw ones.

    Logged: ``teacher_entropy``, ``student_entropy``, ``correction_mass`` (teacher mass on the
    correction onsets), ``continue_mass``, ``bimodality``, ``forward_kl``, ``reverse_kl``,
    ``teacher_logprob`` (means over response tokens), ``correction_mass_after_error`` and
    ``bimodality_after_error`` (at the position after each rollout's first error, located by the
    task's ``first_error_char`` when it has one, else by ``t*``), ``t_star_mean``,
    ``fraction_failed`` (rollouts with a ``t*``) and ``accuracy`` (task verifier).

    Args:
        every_n_steps: audit when ``global_step % every_n_steps == 0`` (step 0 included).
        correction_onsets: strings counted as starting a correction; default
            ``task.correction_onsets``. Each must be one token (checked in ``setup``).
        criterion / threshold / top_p: how ``t*`` is found (see `trd_lightning.diagnostics`).
        max_rollouts_logged: traces written per audit (the first rows of the batch).
        histograms: also log histograms where the logger supports them.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        correction_onsets: Sequence[str] | None = None,
        criterion: str = "prob",
        threshold: float = 0.05,
        top_p: float = 0.9,
        max_rollouts_logged: int = 4,
        histograms: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_rollouts_logged < 0:
            raise ValueError(f"max_rollouts_logged must be >= 0, got {max_rollouts_logged}")
        check_criterion(criterion, threshold, top_p)
        self.every_n_steps = every_n_steps
        self.correction_onsets = None if correction_onsets is None else list(correction_onsets)
        self.diag_kwargs = dict(criterion=criterion, threshold=threshold, top_p=top_p)
        self.max_rollouts_logged, self.histograms = max_rollouts_logged, histograms
        self.onset_ids: list[int] | None = None
        self.traces_path: str | None = None
        self.last: dict[str, float] = {}
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # Bad onset strings fail here, before the first rollout is sampled.
        onsets = self.correction_onsets if self.correction_onsets is not None else pl_module.task.correction_onsets
        self.onset_ids = onset_token_ids(pl_module.tokenizer, list(onsets))
        root = trainer.log_dir or trainer.default_root_dir
        self.traces_path = os.path.join(root, "audit", "traces.jsonl")

    def due(self, trainer) -> bool:
        step = trainer.global_step
        # Gradient accumulation runs several batches at one global_step: audit the first only.
        return step % self.every_n_steps == 0 and step != self._last_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.due(trainer):
            return
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            raise RuntimeError(
                "PrefixAudit found no batch['rollout']: use PromptDataModule (it attaches rollouts) "
                "or attach a trd_lightning.rollout.Rollout to the batch before on_train_batch_start"
            )
        self._last_step = trainer.global_step
        if rollout.fused:
            # Sampled already revised (fused splice): there is no raw rollout to audit.
            self.last = self._audit(trainer, pl_module, rollout, "audit/revised/", "revised")
            return
        original = rollout.original
        stats = self._audit(trainer, pl_module, original if original is not None else rollout, "audit/", "raw")
        if original is not None:
            stats.update(self._audit(trainer, pl_module, rollout, "audit/revised/", "revised"))
        self.last = stats

    def _audit(self, trainer, module, rollout, prefix: str, kind: str) -> dict[str, float]:
        task, tok = module.task, module.tokenizer
        if self.onset_ids is None:  # used outside fit (a test driving hooks by hand)
            self.setup(trainer, module, "fit")
        d = diagnose(module, rollout, self.onset_ids, **self.diag_kwargs)
        texts, verdicts = decode_and_verify(task, tok, rollout.problems, rollout)
        correct = torch.tensor(verdicts)
        first, source = first_errors(task, tok, rollout, texts, d, "auto")
        summary = summarize(d, first, correct, window=0)
        mean, after = summary["mean"], summary["after_error"]
        stats = {
            "teacher_entropy": mean["teacher_entropy"],
            "student_entropy": mean["student_entropy"],
            "correction_mass": mean["onset_mass"],
            "continue_mass": mean["continue_mass"],
            "bimodality": mean["bimodality"],
            "forward_kl": mean["forward_kl"],
            "reverse_kl": mean["reverse_kl"],
            "teacher_logprob": mean["teacher_logprob"],
            "correction_mass_after_error": after["onset_mass"],
            "bimodality_after_error": after["bimodality"],
            "t_star_mean": summary["t_star"]["mean"],
            "fraction_failed": summary["t_star"]["fraction_failed"],
            "accuracy": summary["accuracy"],
        }
        stats = {prefix + k: v for k, v in stats.items()}
        bs = len(rollout.problems)
        for name, value in stats.items():
            if not math.isnan(value):  # NaN (no error in this batch) would poison epoch means
                module.log(name, value, on_step=True, on_epoch=False, batch_size=bs)
        if self.histograms:
            self._histograms(trainer, d, prefix)
        if self.max_rollouts_logged and trainer.is_global_zero:
            records = rollout_traces(
                task, tok, rollout, d, texts, correct, first, limit=self.max_rollouts_logged,
                step=trainer.global_step, trajectory=kind, first_error_source=source,
            )  # fmt: skip
            os.makedirs(os.path.dirname(self.traces_path), exist_ok=True)
            with open(self.traces_path, "a") as f:
                for rec in records:
                    f.write(json.dumps(json_safe(rec)) + "\n")
        return stats

    def _histograms(self, trainer, d, prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        values = {
            "teacher_entropy": d.teacher_entropy[d.mask],
            "correction_mass": d.onset_mass[d.mask],
            "bimodality": d.bimodality[d.mask],
            "t_star": d.t_star[d.t_star >= 0].float(),
        }
        for logger in trainer.loggers:
            add = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if not callable(add):
                continue
            for name, v in values.items():
                if v.numel():
                    add(prefix + name, v, global_step=trainer.global_step)

"""`CollapseGuard`: watch the student's own rollouts for the signatures of a collapsing run."""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

_SIGNALS = ("length", "repetition", "entropy", "gap")


def repetition_rate(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = 4) -> float:
    """Mean over rows of ``1 - distinct n-grams / n-grams`` (rows shorter than ``n`` count 0).

    A row that loops (``|1+1=2|1+1=2|1+1=2``) repeats most of its n-grams; a normal solution almost
    none. Token ids, so it works with any tokenizer.
    """
    rates = []
    for ids, m in zip(response_ids, response_mask):
        row = ids[m.bool()].tolist()
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / max(len(rates), 1)


def _mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy (nats) of the distributions over masked positions."""
    logp = logits.float().log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    m = mask.bool()
    return float(ent[m].sum() / m.sum().clamp(min=1))


class CollapseGuard(Callback):
    """Raises an alert when the student's rollouts show a collapse, and optionally stops or rolls back.

    Every training step it measures, on the student's own rollout ``y_o`` (the raw rollout that
    `TrajectoryRevision` keeps in ``info["original"]``; the batch's rollout otherwise):

    * ``length``: mean response length; alert when the mean over the last ``window`` steps exceeds
      ``length_ratio`` times the reference;
    * ``repetition``: `repetition_rate` (repeated token ``ngram``-grams); alert when it exceeds the
      reference by ``repetition_delta``;
    * ``entropy``: the student's mean token entropy along ``y_o`` (one no-grad student forward every
      ``entropy_every_n_steps``); alert when it falls below ``entropy_ratio`` times the reference;
    * ``gap``: ``pass@k - pass@1`` whenever an evaluation callback (`PassAtKEvaluation`,
      `LearningCurve`) publishes new values of ``gap_metrics`` in its ``last`` dict; alert when it
      exceeds its first value by ``gap_delta``;
    * ``drops``: any other scalar a callback publishes (``last`` dict, or the latest entry of its
      ``history`` list: ``revision/accuracy_after`` of `TrajectoryRevision`, ``curve/avg@16`` of
      `LearningCurve`), ``{name: max_drop}``; alert when the mean of its values published in the
      last ``window`` steps (one value for an evaluation every ``window`` steps or more) falls more
      than ``max_drop`` below the best such mean so far. The collapse of the
      paper's rewrite reviser on the arithmetic task shows here (the refiner's rewrites stop being
      correct) and in none of the four signals above (docs/fidelity.md).

    The reference of the per-step signals is their median over the first ``warmup_steps`` steps.
    A signal that holds for ``patience`` consecutive checks raises an alert: a warning naming the
    signal, its value, the reference and the threshold, a ``collapse/alert`` scalar, and an entry in
    ``alerts``. Every signal is logged under ``collapse/`` each step and kept in ``history``.

    Args:
        action: ``alert`` (log only), ``stop`` (``trainer.should_stop``), or ``rollback``: reload the
            last good checkpoint (weights and optimizer state), saved every ``save_every_n_steps``
            while no signal holds, then go on; after ``max_rollbacks`` rollbacks it stops instead.
        checkpoint_dir: where ``last_good.ckpt`` goes (default: ``<log_dir>/collapse_guard``).
        a threshold set to ``None`` switches its signal off.

    Example (YAML)::

        - class_path: trd_lightning.callbacks.CollapseGuard
          init_args: {length_ratio: 1.5, drops: {revision/accuracy_after: 0.3}, action: rollback}
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        window: int = 10,
        patience: int = 3,
        length_ratio: float | None = 1.5,
        repetition_delta: float | None = 0.15,
        ngram: int = 4,
        entropy_ratio: float | None = 0.25,
        entropy_every_n_steps: int = 1,
        gap_delta: float | None = 0.15,
        gap_metrics: tuple[str, str] = ("val/pass@8", "val/pass@1"),
        drops: dict[str, float] | None = None,
        action: Literal["alert", "stop", "rollback"] = "alert",
        save_every_n_steps: int = 10,
        max_rollbacks: int = 1,
        checkpoint_dir: str | None = None,
    ):
        if action not in ("alert", "stop", "rollback"):
            raise ValueError(f"unknown action {action!r}; choose 'alert', 'stop' or 'rollback'")
        for name, value in (("warmup_steps", warmup_steps), ("window", window), ("patience", patience), ("ngram", ngram),
                            ("entropy_every_n_steps", entropy_every_n_steps), ("save_every_n_steps", save_every_n_steps)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if length_ratio is not None and length_ratio <= 1:
            raise ValueError(f"length_ratio must be > 1 (a multiple of the reference length), got {length_ratio}")
        if entropy_ratio is not None and not 0 < entropy_ratio < 1:
            raise ValueError(f"entropy_ratio must be in (0, 1) (a fraction of the reference entropy), got {entropy_ratio}")
        for name, value in (("repetition_delta", repetition_delta), ("gap_delta", gap_delta)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if len(gap_metrics) != 2:
            raise ValueError(f"gap_metrics must name two metrics (pass@k, pass@1), got {gap_metrics!r}")
        self.warmup_steps, self.window, self.patience, self.ngram = warmup_steps, window, patience, ngram
        self.length_ratio, self.repetition_delta = length_ratio, repetition_delta
        self.entropy_ratio, self.entropy_every_n_steps = entropy_ratio, entropy_every_n_steps
        self.gap_delta, self.gap_metrics = gap_delta, tuple(gap_metrics)
        self.drops = dict(drops or {})
        for name, value in self.drops.items():
            if not value > 0:
                raise ValueError(f"drops[{name!r}] must be > 0 (how far below its best the metric may fall), got {value}")
        self._best: dict[str, float] = {}
        self._drop_recent: dict[str, deque] = {k: deque() for k in self.drops}  # (step, value)
        self._drop_seen: dict[str, int] = {}
        self._drop_streak: dict[str, int] = dict.fromkeys(self.drops, 0)
        self.action, self.save_every_n_steps, self.max_rollbacks = action, save_every_n_steps, max_rollbacks
        self.checkpoint_dir = checkpoint_dir
        self.reference: dict[str, float] = {}
        self.history: list[dict] = []
        self.alerts: list[dict] = []
        self.rollbacks = 0
        self.last_good_step: int | None = None
        self._warm: dict[str, list[float]] = {k: [] for k in _SIGNALS}
        self._recent: dict[str, deque] = {k: deque(maxlen=window) for k in _SIGNALS}
        self._streak: dict[str, int] = dict.fromkeys(_SIGNALS, 0)
        self._seen_gap: tuple[float, float] | None = None
        self._pending: dict[str, float] = {}
        self._pending_step = 0

    # --- measuring ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            return
        raw = rollout.original or rollout  # the student's own y_o, before revision
        signals = {
            "length": float(raw.response_mask.sum(-1).float().mean()),
            "repetition": repetition_rate(raw.response_ids, raw.response_mask, self.ngram),
        }
        if self.entropy_ratio is not None and trainer.global_step % self.entropy_every_n_steps == 0:
            with torch.no_grad():  # measured before this step's update, on the weights that sampled y_o
                signals["entropy"] = _mean_entropy(pl_module.score(raw.student, role="student"), raw.response_mask)
        self._pending = signals
        self._pending_step = trainer.global_step  # the step whose weights sampled y_o

    def _new_gap(self, trainer) -> float | None:
        high, low = self.gap_metrics
        for cb in trainer.callbacks:
            last = getattr(cb, "last", None)
            if isinstance(last, dict) and high in last and low in last:
                pair = (float(last[high]), float(last[low]))
                if pair != self._seen_gap:
                    self._seen_gap = pair
                    return pair[0] - pair[1]
        return None

    def _published(self, trainer) -> dict[str, tuple[float, tuple]]:
        """The watched metrics other callbacks publish, each with a tag that changes with a new value:
        the length of a ``history`` list, or the value itself for a ``last`` dict."""
        found: dict[str, tuple[float, tuple]] = {}
        for cb in trainer.callbacks:
            if cb is self:
                continue
            history, last = getattr(cb, "history", None), getattr(cb, "last", None)
            if isinstance(history, list) and history and isinstance(history[-1], dict):
                for name in self.drops:
                    if name in history[-1] and name not in found:
                        found[name] = (float(history[-1][name]), (id(cb), len(history)))
            if isinstance(last, dict):
                for name in self.drops:
                    if name in last and name not in found:
                        found[name] = (float(last[name]), (id(cb), "last", float(last[name])))
        return found

    def _check_drops(self, trainer, step: int) -> tuple[dict[str, float], list[dict]]:
        values, firing = {}, []
        for name, (value, tag) in self._published(trainer).items():
            if self._drop_seen.get(name) == tag or math.isnan(value):
                continue  # not a new value
            self._drop_seen[name] = tag
            recent = self._drop_recent[name]
            recent.append((step, value))
            while recent and recent[0][0] <= step - self.window:
                recent.popleft()
            smoothed = sum(v for _, v in recent) / len(recent)
            best = max(self._best.get(name, smoothed), smoothed)
            self._best[name] = best
            values[name] = smoothed
            holds = smoothed < best - self.drops[name]
            self._drop_streak[name] = self._drop_streak[name] + 1 if holds else 0
            if holds and self._drop_streak[name] == self.patience:
                firing.append({"step": step, "signal": name, "value": smoothed, "reference": best, "threshold": best - self.drops[name]})
        return values, firing

    # --- deciding ----------------------------------------------------------------------------
    def _holds(self, name: str, value: float) -> tuple[bool, float | None]:
        ref = self.reference.get(name)
        if ref is None or math.isnan(value):
            return False, None
        if name == "length" and self.length_ratio is not None:
            return value > self.length_ratio * ref, self.length_ratio * ref
        if name == "repetition" and self.repetition_delta is not None:
            return value > ref + self.repetition_delta, ref + self.repetition_delta
        if name == "entropy" and self.entropy_ratio is not None:
            return value < self.entropy_ratio * ref, self.entropy_ratio * ref
        if name == "gap" and self.gap_delta is not None:
            return value > ref + self.gap_delta, ref + self.gap_delta
        return False, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self._pending_step if self._pending else trainer.global_step
        signals = dict(self._pending)
        self._pending = {}
        gap = self._new_gap(trainer)
        if gap is not None:
            signals["gap"] = gap
            self.reference.setdefault("gap", gap)  # the first evaluation is the gap's reference
        record: dict[str, float] = {"step": step}
        firing = []
        for name, value in signals.items():
            if name != "gap":
                if len(self._warm[name]) < self.warmup_steps:
                    self._warm[name].append(value)
                    if len(self._warm[name]) == self.warmup_steps:
                        self.reference[name] = statistics.median(self._warm[name])
                self._recent[name].append(value)
                smoothed = sum(self._recent[name]) / len(self._recent[name])
            else:
                smoothed = value
            record[name] = smoothed
            holds, threshold = self._holds(name, smoothed)
            self._streak[name] = self._streak[name] + 1 if holds else 0
            if holds and self._streak[name] == self.patience:
                firing.append({"step": step, "signal": name, "value": smoothed, "reference": self.reference[name], "threshold": threshold})
        if self.drops:
            values, dropped = self._check_drops(trainer, step)
            record.update(values)
            firing += dropped
        bs = len(batch["rollout"].problems) if isinstance(batch, dict) and "rollout" in batch else 1
        for name in _SIGNALS:
            if name in record:
                pl_module.log(f"collapse/{name}", record[name], batch_size=bs)
        alert = trainer.strategy.reduce_boolean_decision(bool(firing), all=False)
        record["alert"] = float(alert)
        pl_module.log("collapse/alert", float(alert), batch_size=bs)
        self.history.append(record)
        if alert:
            self._alert(trainer, pl_module, firing, step)
        elif self.action == "rollback" and self._healthy() and step % self.save_every_n_steps == 0:
            trainer.save_checkpoint(self._checkpoint_path(trainer))
            self.last_good_step = step

    def _healthy(self) -> bool:
        return len(self.reference) >= 1 and not any(self._streak.values()) and not any(self._drop_streak.values())

    def _alert(self, trainer, pl_module, firing: list[dict], step: int) -> None:
        self.alerts.extend(firing)
        what = "; ".join(
            f"{f['signal']} {f['value']:.3g} vs reference {f['reference']:.3g} (threshold {f['threshold']:.3g})" for f in firing
        ) or "another rank's signals"
        if self.action == "rollback" and self.last_good_step is not None and self.rollbacks < self.max_rollbacks:
            self._rollback(trainer, pl_module)
            rank_zero_warn(f"CollapseGuard: collapse signal at step {step}: {what}; rolled back to step {self.last_good_step}")
            return
        stopping = self.action == "stop" or self.action == "rollback"
        if stopping:
            trainer.should_stop = True
        reason = "" if self.action != "rollback" else (
            " (no good checkpoint saved yet)" if self.last_good_step is None else f" ({self.rollbacks} rollback(s) already)"
        )
        rank_zero_warn(f"CollapseGuard: collapse signal at step {step}: {what}" + ("; stopping" + reason if stopping else ""))

    def _checkpoint_path(self, trainer) -> str:
        folder = self.checkpoint_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "collapse_guard")
        return os.path.join(folder, "last_good.ckpt")

    def _rollback(self, trainer, pl_module) -> None:
        """Weights and optimizer state of the last good checkpoint; the step counter goes on."""
        ckpt = torch.load(self._checkpoint_path(trainer), map_location=pl_module.device, weights_only=False)
        pl_module.load_state_dict(ckpt["state_dict"])
        for optimizer, state in zip(trainer.optimizers, ckpt.get("optimizer_states", [])):
            optimizer.load_state_dict(state)
        self.rollbacks += 1
        for name in _SIGNALS:  # judge the restored weights afresh
            self._recent[name].clear()
            self._streak[name] = 0
        for name in self.drops:
            self._drop_recent[name].clear()
            self._drop_streak[name] = 0

    def state_dict(self) -> dict:
        return {"reference": self.reference, "best": self._best, "alerts": self.alerts, "rollbacks": self.rollbacks,
                "last_good_step": self.last_good_step}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        self.reference = dict(state_dict.get("reference", {}))
        for name in self.reference:  # a resumed run keeps its reference instead of warming up again
            self._warm[name] = [self.reference[name]] * self.warmup_steps
        self.alerts = list(state_dict.get("alerts", []))
        self._best = dict(state_dict.get("best", {}))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.last_good_step = state_dict.get("last_good_step")
